"""Fine-tune a RoPE language model for a longer context: ``python train.py --config configs/quickstart.yaml``."""

from posheads.lit.cli import main

if __name__ == "__main__":
    main()
