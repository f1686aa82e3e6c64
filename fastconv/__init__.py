"""fastconv: readable, fast CPU convolution kernels in Numba.

>>> import numpy as np, fastconv as fc
>>> y = fc.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 2, 2), np.float32))
>>> y.shape
(1, 1, 2, 2)
"""

from . import conv, plan
from .conv import *  # noqa: F403  (the public API is conv.__all__ and plan.__all__)
from .plan import *  # noqa: F403

__version__ = "0.1.0"
__all__ = list(conv.__all__) + list(plan.__all__)
