"""Train CMAL-Net (TResNet-L-V2) on FGVC-Aircraft: 100 variants, 368 px, paper accuracy 94.7 %.

Edit the settings below, or override any of them: python train_Aircraft_TResNet_L.py
--data_path=/data/Aircraft --batch_size=16. `--help` lists every setting.
"""
import sys

from cmal import train

# ---- settings ------------------------------------------------------------------------------
data_path = "./data/Aircraft"        # holds train/<class>/ and test/<class>/ (see prepare_data.py)
num_classes = 100
epochs = 200
batch_size = 16
output_dir = "Results_Aircraft_TResNet_L"
weights = "in21k"                    # the reference's ImageNet-21K-P TResNet-L-V2 (HF hub)
# ----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    sys.exit(train.main_from_script(globals()))
