"""A minute with heba's modules: build, run, train a step, save and reload.

    python examples/quickstart.py
"""

import torch

import heba.info
import heba.nn

print(heba.info.report(), "\n")
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)

# ViT-B/16 tokens: a class token + a 14x14 patch grid, width 768 (batch-first, as open_clip 3.3)
x = torch.randn(4, 1 + 14 * 14, 768, device=device)
visual = heba.nn.HeBAAdapter(768, modality="visual").to(device)        # attn position
visual_mlp = heba.nn.HeBAAdapter(3072, modality="visual").to(device)   # after mlp.c_fc
text = heba.nn.HeBAAdapter(512, modality="text").to(device)
lowrank = heba.nn.LowRankAdapter(768, rank=16).to(device)

y = visual(x, scale=0.025)
print("visual:", tuple(y.shape), "class token untouched:", torch.equal(y[:, 0], x[:, 0]))
print("text:  ", tuple(text(torch.randn(8, 77, 512, device=device), scale=0.025).shape))
print("low-rank identity at start:", torch.equal(lowrank(x), x))

# one SGD step on a toy objective: the adapters learn, the input gradient is exact
opt = torch.optim.SGD(list(visual.parameters()) + list(lowrank.parameters()), lr=0.1)
target = torch.randn_like(x)
for step in range(3):
    loss = (lowrank(visual(x, scale=0.025)) - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.5f}")

# state dicts use the published parameter names: checkpoints move across backends
sd = visual.state_dict()
print("keys:", list(sd))
again = heba.nn.HeBAAdapter(768, modality="visual", backend="reference").to(device)
again.load_state_dict(sd, strict=True)
print("reloaded output matches:", torch.allclose(again(x, scale=0.025), visual(x, scale=0.025)))
