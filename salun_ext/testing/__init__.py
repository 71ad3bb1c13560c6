"""Tiny models and fixtures that build and run on a CPU in seconds with no download: tests, docs examples, demos.

diffusion.py   tiny class-conditional / Stable Diffusion models and the real CLIP tokenizer (offline)
"""
