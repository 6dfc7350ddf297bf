"""Triton kernels, installed as the subpackage ``blip_fast.kernels`` (``package_dir`` in setup.py).

One file per fused op (added by later issues), each holding its ``@triton.jit`` kernels, their host launchers and
one thin ``torch.autograd.Function``. Models never import this package: ``blip_fast.ops`` is the single switch
point that picks the Triton, CUDA (``blip_fast._C``) or pure-torch reference backend.
"""
