"""TensorBoard, an optional dependency: its writer class, or what to install."""
from cmal.errors import UserError


def tensorboard_writer_class():
    """torch's SummaryWriter, or a UserError saying how to install what it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package, which is not installed: "
                        "pip install tensorboard (or pip install -e '.[tensorboard]'), or leave "
                        "out --tensorboard") from None
    return SummaryWriter
