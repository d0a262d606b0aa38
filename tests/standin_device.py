"""A stand-in accelerator for machines without one: tensors "on the GPU" are CPU tensors that know it.

Inside `StandinDevice("cuda")` (or "mps"), `torch.device("cuda")` works as on a GPU machine: factories
with `device="cuda"`, `.to("cuda")`, `.cuda()` and `model.to("cuda")` give tensors that report
`device == cuda:0` but compute on the CPU. Every torch operation is checked the way a GPU checks it:

- tensors on the stand-in and tensors on the CPU may not meet in one operation (a 0-dim CPU tensor, a
  scalar, may: CUDA allows that too); a CPU tensor may not be indexed with stand-in indices;
- a stand-in tensor cannot become numpy without `.cpu()` first;
- float64 is refused on the stand-in (Apple's MPS has none, and the course keeps float64 on the CPU).

`torch.cuda.is_available()` answers True inside it, and the device answers like Colab's free T4:
compute capability 7.5 (unless told otherwise), with `torch.cuda.is_bf16_supported()` True (it is
emulated there).
So code that passes here keeps its tensors on one device and its float64 on the CPU.
"""
from __future__ import annotations

import copy

import torch
import torch._dynamo  # noqa: F401  (the optimizers import it lazily, and its import runs torch code)
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map


class OnStandin(torch.Tensor):
    """A CPU tensor marked as living on the stand-in device (the mode does all the work)."""

    __torch_function__ = torch._C._disabled_torch_function_impl


_CONVERSIONS = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.copy_}
_TO_NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}
_BOOKKEEPING = {torch._has_compatible_shallow_copy_type}  # compares tensors' types, computes nothing


class DeviceMismatch(RuntimeError):
    pass


def _tensors(values):
    """The tensors among values and inside lists and tuples of them (torch.cat's argument, say)."""
    found = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found += _tensors(v)
    return found


class StandinDevice(TorchFunctionMode):
    def __init__(self, kind="cuda", *, capability=(7, 5)):
        super().__init__()
        if kind not in ("cuda", "mps"):
            raise ValueError(f"kind must be 'cuda' or 'mps', got {kind!r}")
        self.kind = kind
        self.device = torch.device(kind, 0)
        self.capability = capability  # a CUDA stand-in's compute capability: 7.5 is Colab's free T4
        self._saved = []

    # -- entering and leaving: torch.cuda answers as on a T4, module conversion keeps our tensor type --
    def __enter__(self):
        # model.to(stand-in) must replace each Parameter by one of our type, not copy into the old one
        self._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        patches = [(torch.accelerator, "current_accelerator", lambda check_available=False: None)]  # no streams here
        if self.kind == "cuda":
            patches += [(torch.cuda, "is_available", lambda: True), (torch.cuda, "device_count", lambda: 1),
                        (torch.cuda, "get_device_capability", lambda device=None: self.capability),
                        (torch.cuda, "is_bf16_supported", lambda including_emulation=True: True),
                        (torch.cuda, "get_device_name", lambda device=None: "stand-in T4"),
                        (torch.cuda, "synchronize", lambda device=None: None),
                        (torch.cuda, "set_device", lambda device: None)]
        else:
            patches += [(torch.backends.mps, "is_available", lambda: True),
                        (torch.cuda, "is_available", lambda: False)]
        for obj, name, value in patches:
            self._saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)
        return super().__enter__()

    def __exit__(self, *exc):
        while self._saved:
            obj, name, value = self._saved.pop()
            setattr(obj, name, value)
        torch.__future__.set_overwrite_module_params_on_conversion(self._overwrite)
        return super().__exit__(*exc)

    # -- the checks --
    def _is_ours(self, device):
        return device is not None and torch.device(device).type == self.kind

    def _wrap(self, out):
        def wrap(t):
            if isinstance(t, torch.Tensor) and not isinstance(t, OnStandin):
                if t.dtype == torch.float64:
                    raise TypeError(f"float64 on the {self.kind} stand-in: MPS has no float64, and the course "
                                    "keeps float64 on the CPU (move to the CPU first)")
                return t.as_subclass(OnStandin)
            return t
        return tree_map(wrap, out)

    @staticmethod
    def _unwrap(out):
        return tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, OnStandin) else t, out)

    def _check_same_device(self, func, tensors):
        ours = [t for t in tensors if isinstance(t, OnStandin)]
        cpu = [t for t in tensors if not isinstance(t, OnStandin) and t.dim() > 0]
        if ours and cpu:
            raise DeviceMismatch(f"{getattr(func, '__name__', func)}: expected all tensors to be on the same device, "
                                 f"but found at least two devices, {self.device} and cpu! (shapes "
                                 f"{tuple(ours[0].shape)} and {tuple(cpu[0].shape)})")
        for t in ours:
            if t.dtype == torch.float64:
                raise TypeError(f"{getattr(func, '__name__', func)}: float64 on the {self.kind} stand-in")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = _tensors(args) + _tensors(kwargs.values())
        ours = any(isinstance(t, OnStandin) for t in flat)

        if func == torch.Tensor.device.__get__:  # (property getters are new objects each time: compare with ==)
            return self.device if isinstance(args[0], OnStandin) else func(*args)
        if func == torch.Tensor.is_cuda.__get__ or func == torch.Tensor.is_mps.__get__:
            want = "cuda" if func == torch.Tensor.is_cuda.__get__ else "mps"
            return isinstance(args[0], OnStandin) and self.kind == want
        if func == torch.Tensor.is_cpu.__get__:
            return not isinstance(args[0], OnStandin)
        if func in _TO_NUMPY and isinstance(args[0], OnStandin):
            raise TypeError(f"can't convert {self.device} device type tensor to numpy. Use Tensor.cpu() to copy "
                            "the tensor to host memory first.")
        if func is torch.Tensor.__format__ and isinstance(args[0], OnStandin):  # f"{loss:.3f}" works on a GPU
            return args[0].as_subclass(torch.Tensor).__format__(*args[1:])
        if func is torch.Tensor.__deepcopy__ and isinstance(args[0], OnStandin):  # copy.deepcopy(model), as EMA does
            src, memo = args
            out = src.detach().clone().as_subclass(OnStandin).requires_grad_(src.requires_grad)  # a leaf, as the source
            out.__dict__.update(copy.deepcopy(src.__dict__, memo))  # keeps a parameter a parameter
            memo[id(src)] = out
            return out
        if func is torch.Tensor.__reduce_ex__ and isinstance(args[0], OnStandin):  # torch.save: as a plain tensor
            return args[0].as_subclass(torch.Tensor).__reduce_ex__(*args[1:])
        if func in _BOOKKEEPING:
            return func(*args, **kwargs)
        if func in _CONVERSIONS:
            return self._convert(func, args, kwargs)
        if func is torch.Tensor.__getitem__:
            self_t, index = args[0], args[1]
            index_tensors = _tensors(index if isinstance(index, tuple) else (index,))
            if not isinstance(self_t, OnStandin) and any(isinstance(i, OnStandin) for i in index_tensors):
                raise DeviceMismatch("indices should be either on cpu or on the same device as the indexed "
                                     f"tensor (cpu), got indices on {self.device}")
            out = func(*args, **kwargs)
            return self._wrap(out) if isinstance(self_t, OnStandin) else out
        if func is torch.Tensor.__setitem__:
            self._check_same_device(func, [args[0]] + _tensors(args[2:]))
            return func(*args, **kwargs)

        if "device" in kwargs and self._is_ours(kwargs["device"]):  # a factory: torch.zeros(..., device=cuda)
            kwargs = {**kwargs, "device": "cpu"}
            self._check_same_device(func, flat)
            return self._wrap(func(*args, **kwargs))
        self._check_same_device(func, flat)
        out = func(*args, **kwargs)
        return self._wrap(out) if ours else out

    def _convert(self, func, args, kwargs):
        src = args[0]
        if func is torch.Tensor.cpu:
            return self._unwrap(func(*args, **kwargs))
        if func is torch.Tensor.cuda:
            if self.kind != "cuda":
                raise RuntimeError("Torch not compiled with CUDA enabled (the stand-in is an MPS device)")
            return self._wrap(src.as_subclass(torch.Tensor).clone())
        if func is torch.Tensor.copy_:  # copies across devices are allowed
            return func(*args, **kwargs)
        # Tensor.to(device?, dtype?, ...) or .to(other_tensor): parse, then call .to on the CPU
        if len(args) > 1 and isinstance(args[1], torch.Tensor):
            device, dtype, fmt = args[1].device, args[1].dtype, kwargs.get("memory_format")
        else:
            device, dtype, _, fmt = torch._C._nn._parse_to(*args[1:], **kwargs)
        options = {k: v for k, v in (("dtype", dtype), ("memory_format", fmt), ("copy", kwargs.get("copy"))) if v}
        if device is None:
            out = func(src, **options)
            return self._wrap(out) if isinstance(src, OnStandin) else out
        if self._is_ours(device):
            if isinstance(src, OnStandin):  # already there: at most a change of dtype or layout
                return self._wrap(func(src, **options))
            out = func(src, "cpu", **options)
            return self._wrap(out.clone() if out.data_ptr() == src.data_ptr() else out)  # a real copy, as to a GPU
        if torch.device(device).type == "cpu":
            return self._unwrap(func(src, "cpu", **options))
        raise RuntimeError(f"the stand-in is {self.device}; {device} is not available")
