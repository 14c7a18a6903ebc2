"""Train CMAL-Net (TResNet-L-V2) on Stanford Cars: 196 classes, 368 px, paper accuracy 97.1 %.

Edit the settings below, or override any of them: python train_Stanford_Cars_TResNet_L.py
--data_path=/data/Stanford_Cars --batch_size=16. `--help` lists every setting.
"""
# The reference started this run from a TResNet-L-V2 already fine-tuned on Stanford Cars
# (stanford_cars_tresnet-l-v2_96_27.pth), which is no longer published: its authors' link answers
# 403 Forbidden since 2026-05 (Alibaba-MIIL/TResNet issue #57). This script therefore starts from
# the ImageNet-21K-P pretraining (in21k), as the Aircraft and Food-11 scripts do. With a copy of
# the Cars file, pass --weights=/path/to/stanford_cars_tresnet-l-v2_96_27.pth;
# --weights=stanford_cars still works where an earlier download is cached ($CMAL_CACHE, by
# default ~/.cache/cmal).
import sys

from cmal import train

# ---- settings ------------------------------------------------------------------------------
data_path = "./data/Stanford_Cars"   # holds train/<class>/ and test/<class>/ (see prepare_data.py)
num_classes = 196
epochs = 200
batch_size = 16
output_dir = "Results_Stanford_Cars_TResNet_L"
weights = "in21k"                    # the reference used the unpublished Cars file: see above
# ----------------------------------------------------------------------------------------------

if __name__ == "__main__":
    sys.exit(train.main_from_script(globals()))
