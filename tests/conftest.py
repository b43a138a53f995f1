"""Test-session switches read from the environment.

``HEBA_HIDE_OPEN_CLIP=1`` makes ``import open_clip`` fail as on a machine without
it (the GPU check's machine has none): the tests that need it skip with the reason.
"""

from benchmarks.gpu_check_plugin import hide_open_clip_if_asked

hide_open_clip_if_asked()
