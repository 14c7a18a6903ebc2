"""Train CMAL-Net on any image folder: python train.py --data_path=DATA --num_classes=N.

The three train_*_TResNet_L.py scripts are the same run with a dataset's settings at their top;
`--help` lists every setting. The run itself is `cmal/train.py`.
"""
import sys

from cmal.train import main

if __name__ == "__main__":
    sys.exit(main())
