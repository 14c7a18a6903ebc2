"""Train CMAL-Net (TResNet-L-V2) on Stanford Cars: 196 classes, 368 px, paper accuracy 97.1 %.

Edit the settings below, or override any of them: python train_Stanford_Cars_TResNet_L.py
--data_path=/data/Stanford_Cars --batch_size=16. `--help` lists every setting.
"""
import sys

from cmal import train

# ---- settings ------------------------------------------------------------------------------
data_path = "./data/Stanford_Cars"   # holds train/<class>/ and test/<class>/ (see prepare_data.py)
num_classes = 196
epochs = 200
batch_size = 16
output_dir = "Results_Stanford_Cars_TResNet_L"
weights = "stanford_cars"            # the published Cars-fine-tuned TResNet-L-V2, as the reference
# ----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    sys.exit(train.main_from_script(globals()))
