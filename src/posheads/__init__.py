"""posheads: length-extrapolation fine-tuning of RoPE language models and the study of Positional Heads.

Hong et al., "On the token distance modeling ability of higher RoPE attention dimension",
arXiv 2410.08703 (Findings of EMNLP 2024).
"""

__version__ = "0.1.0"
