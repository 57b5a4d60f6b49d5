"""sdsopt: AdamW for LoRA with singular values decoupled from the gradient (SDS-LoRA).

>>> from sdsopt import SDSAdamW
>>> opt = SDSAdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # doctest: +SKIP
"""

from .optim import PairingNotice, SDSAdamW
from .pairing import PEFT_PATTERN, LoraPair, default_pairing, peft_pairing, regex_pairing
from .psi import PSILoRA
from .modes import MODES
from .rewrite import rewrite_pair

__all__ = ["MODES", "PEFT_PATTERN", "LoraPair", "PSILoRA", "PairingNotice", "SDSAdamW", "default_pairing",
           "peft_pairing", "regex_pairing", "rewrite_pair"]
__version__ = "0.2.0"
