"""An example third-party attack: a white square in the top-left corner (dirty-label)."""
from dataclasses import dataclass

from nadbench import Attack, hookimpl, param


@dataclass(frozen=True)
class WhiteSquareConfig:
    target: int = param(0, "target label", min=0)
    poison_rate: float = param(0.1, "share of training images poisoned", min=0.0, max=1.0)
    size: int = param(4, "side of the square in pixels", min=1, max=16)


class WhiteSquare(Attack):
    name = "whitesquare"
    Config = WhiteSquareConfig
    description = "white square in the top-left corner"

    def apply_trigger(self, images):
        out = images.clone()
        out[..., : self.config.size, : self.config.size] = 255
        return out


@hookimpl
def register_attacks(register):
    register(WhiteSquare)
