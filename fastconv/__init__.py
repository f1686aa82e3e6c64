"""fastconv: readable, fast CPU convolution kernels in Numba.

>>> import numpy as np, fastconv as fc
>>> y = fc.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 2, 2), np.float32))
>>> y.shape
(1, 1, 2, 2)
"""

from . import conv, functional, plan
from .conv import *  # noqa: F403  (the public API is the modules' __all__)
from .functional import *  # noqa: F403
from .plan import *  # noqa: F403

__version__ = "0.1.0"
__all__ = list(conv.__all__) + list(functional.__all__) + list(plan.__all__)
