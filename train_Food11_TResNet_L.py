"""Train CMAL-Net (TResNet-L-V2) on Food-11: 11 classes, 368 px.

Edit the settings below, or override any of them: python train_Food11_TResNet_L.py
--data_path=/data/Food-11 --batch_size=16. `--help` lists every setting.
"""
import sys

from cmal import train

# ---- settings ------------------------------------------------------------------------------
data_path = "./data/Food-11"         # holds train/<class>/ and test/<class>/ (see prepare_data.py)
num_classes = 11
epochs = 200
batch_size = 16
output_dir = "Results_Food11_TResNet_L"
weights = "in21k"                    # the reference's ImageNet-21K-P TResNet-L-V2 (HF hub)
# ----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    sys.exit(train.main_from_script(globals()))
