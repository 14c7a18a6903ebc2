"""TResNet-L-V2, reimplemented so that it builds without a GPU and loads the published weights."""
