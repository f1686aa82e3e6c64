"""fastconv: readable, fast CPU convolution kernels in Numba.

>>> import numpy as np, fastconv as fc
>>> y = fc.conv2d(np.ones((1, 1, 3, 3), np.float32), np.ones((1, 1, 2, 2), np.float32))
>>> y.shape
(1, 1, 2, 2)
"""

from .conv import (
    conv2d,
    conv2d_grad_bias,
    conv2d_grad_input,
    conv2d_grad_weight,
    conv_geometry,
    conv_output_size,
    get_num_threads,
    set_num_threads,
)

__version__ = "0.1.0"

__all__ = [
    "conv2d",
    "conv2d_grad_bias",
    "conv2d_grad_input",
    "conv2d_grad_weight",
    "conv_geometry",
    "conv_output_size",
    "get_num_threads",
    "set_num_threads",
]
