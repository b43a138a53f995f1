"""Tools for people who use heba: not part of the installed package."""
