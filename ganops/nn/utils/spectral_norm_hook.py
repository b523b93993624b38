"""ganops.nn.utils.spectral_norm: a drop-in for the older hook API torch.nn.utils.spectral_norm.

Most GAN code (StudioGAN, BigGAN-PyTorch, ...) still registers spectral norm this way and
reads its attributes: the trainable ``<name>_orig`` Parameter, the ``<name>_u`` / ``<name>_v``
buffers, and ``module.<name>``, a plain tensor the forward pre-hook recomputes before each
forward. Everything a user can observe follows torch: the draws of u and v at registration
(no warm-up), one update per forward in training mode, none in eval mode, the state-dict
version metadata and the migration of version-less checkpoints, remove_spectral_norm, the
error on a second registration. The hook objects subclass torch's, so
``torch.nn.utils.remove_spectral_norm`` and code that looks for torch's hook by isinstance
accept a module registered here, and the other way round.

With M the weight as a matrix (``dim`` first, the rest flattened), the hook API updates
v before u,

    v <- normalize(M^T u),   u <- normalize(M v),   sigma = u^T M v,   weight = W / sigma,

the reverse of the parametrization's order. The fused power iteration
(ganops.ops.spectral_norm) runs u <- normalize(A v_a), v_a <- normalize(A^T u) on the matrix
``as_matrix(A, dim)``; given A = M^T (M as a 2-D tensor read with dim=1) and the buffers in
swapped roles (its u is our v, its v our u), that is exactly the hook's v-then-u step, and
its sigma v^T M^T u is the same number. So the training hot path is the one fused op call
per forward, the same kernels as ganops.spectral_norm, and no second implementation.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ganops.ops import spectral_norm as ops

# The module, not the function torch.nn.utils re-exports under the same name.
_torch_hook_api = importlib.import_module("torch.nn.utils.spectral_norm")

# The state-dict format written here, as torch's hook API writes it: version 1 keeps
# <name>_orig, <name>_u and <name>_v; version-less checkpoints also held <name> and no v.
_VERSION = 1


class SpectralNorm(_torch_hook_api.SpectralNorm):
    """The forward pre-hook that sets ``module.<name>`` = ``<name>_orig`` / sigma.

    Subclasses torch's hook so that torch's isinstance checks (a second registration,
    torch.nn.utils.remove_spectral_norm) see it; the work is ganops' own. ``backend`` picks
    ganops' implementation of the power iteration (None: the current ganops backend).
    """

    _version = _VERSION

    def __init__(self, name: str = "weight", n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 backend: str | None = None) -> None:
        super().__init__(name, ops.check_n_power_iterations(n_power_iterations), dim, ops.check_eps(eps))
        self.backend = backend

    def reshape_weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return ops.as_matrix(weight, self.dim)

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> torch.Tensor:
        weight = getattr(module, self.name + "_orig")
        u = getattr(module, self.name + "_u")
        v = getattr(module, self.name + "_v")
        mat = self.reshape_weight_to_matrix(weight)
        # dim=1 reads mat as M^T, and (v, u) are that matrix's (u, v): the fused step is then
        # torch's v-then-u update, in place on the buffers (module docstring). The op keeps
        # copies of the vectors it used for the backward, as torch's clones do, so a later
        # forward's update leaves this forward's backward intact.
        weight_mat, _ = ops.normalize_unchecked(mat, v, u, self.n_power_iterations, self.eps, 1,
                                                do_power_iteration, self.backend)
        return self._matrix_to_weight(weight_mat, weight)

    def _matrix_to_weight(self, mat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of reshape_weight_to_matrix: back to the weight's shape (a view)."""
        if self.dim == 0:
            return mat.view(weight.shape)
        rest = [d for d in range(weight.dim()) if d != self.dim]
        permuted = mat.view([weight.shape[self.dim]] + [weight.shape[d] for d in rest])
        inverse = [0] * weight.dim()
        for position, d in enumerate([self.dim] + rest):
            inverse[d] = position
        return permuted.permute(inverse)

    def remove(self, module: nn.Module) -> None:
        with torch.no_grad():
            weight = self.compute_weight(module, do_power_iteration=False).contiguous()
        for suffix in ("", "_u", "_v", "_orig"):
            delattr(module, self.name + suffix)
        module.register_parameter(self.name, nn.Parameter(weight.detach()))

    def __call__(self, module: nn.Module, inputs) -> None:
        setattr(module, self.name, self.compute_weight(module, do_power_iteration=module.training))

    def solve_v(self, weight_orig: torch.Tensor, u: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The v that a version-less checkpoint did not save: the least-squares solution of
        M v = u (pinv(M) u), rescaled so that u^T M v equals the checkpoint's sigma."""
        mat = self.reshape_weight_to_matrix(weight_orig)
        v = torch.linalg.pinv(mat) @ u
        return v * (sigma / torch.dot(u, mat @ v))

    @staticmethod
    def apply(module: nn.Module, name: str, n_power_iterations: int, dim: int, eps: float,
              backend: str | None = None) -> "SpectralNorm":
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, _torch_hook_api.SpectralNorm) and hook.name == name:
                raise RuntimeError(f"Cannot register two spectral_norm hooks on the same parameter {name}")
        weight = module._parameters.get(name) if isinstance(name, str) else None
        if weight is None:
            raise ValueError(f"`SpectralNorm` cannot be applied: module {type(module).__name__} has no parameter "
                             f"named {name!r} (or it is None)")
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError("The module passed to `SpectralNorm` can't have uninitialized parameters. "
                             "Make sure to run the dummy forward before applying spectral normalization")
        ops.check_weight(weight, name)
        fn = SpectralNorm(name, n_power_iterations, ops.check_dim(dim, weight.dim()), eps, backend)
        with torch.no_grad():
            rows, cols = ops.matrix_size(weight, fn.dim)
            # torch's draws, in torch's order: u then v, N(0, 1) in the weight's dtype and
            # device, normalised; then no power iteration until the first training forward.
            u = nn.functional.normalize(weight.new_empty(rows).normal_(0, 1), dim=0, eps=fn.eps)
            v = nn.functional.normalize(weight.new_empty(cols).normal_(0, 1), dim=0, eps=fn.eps)
        delattr(module, name)
        module.register_parameter(name + "_orig", weight)
        # Until the first forward, module.<name> is the unnormalised weight's data, as in torch.
        setattr(module, name, weight.data)
        module.register_buffer(name + "_u", u)
        module.register_buffer(name + "_v", v)
        module.register_forward_pre_hook(fn)
        module._register_state_dict_hook(SpectralNormStateDictHook(fn))
        module._register_load_state_dict_pre_hook(SpectralNormLoadStateDictPreHook(fn))
        return fn


class SpectralNormStateDictHook(_torch_hook_api.SpectralNormStateDictHook):
    """Writes ``metadata['spectral_norm']['<name>.version']`` into the state dict, as torch does."""

    def __call__(self, module, state_dict, prefix, local_metadata) -> None:
        entries = local_metadata.setdefault("spectral_norm", {})
        key = self.fn.name + ".version"
        if key in entries:
            raise RuntimeError(f"Unexpected key in metadata['spectral_norm']: {key}")
        entries[key] = self.fn._version


class SpectralNormLoadStateDictPreHook(_torch_hook_api.SpectralNormLoadStateDictPreHook):
    """Loads version-less checkpoints: they saved the normalised ``<name>`` and no ``<name>_v``.

    sigma is recovered as mean(<name>_orig / <name>) and v solved from u and sigma
    (SpectralNorm.solve_v); a dict in the current layout that only lacks the metadata loads
    as it is.
    """

    def __call__(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
        fn = self.fn
        version = local_metadata.get("spectral_norm", {}).get(fn.name + ".version", None)
        if version is not None and version >= 1:
            return
        key = prefix + fn.name
        if (version is None and key not in state_dict
                and all(key + suffix in state_dict for suffix in ("_orig", "_u", "_v"))):
            return
        missing = [key + suffix for suffix in ("_orig", "", "_u") if key + suffix not in state_dict]
        if missing:
            if strict:
                missing_keys.extend(missing)
            return
        with torch.no_grad():
            weight_orig = state_dict[key + "_orig"]
            sigma = (weight_orig / state_dict.pop(key)).mean()
            state_dict[key + "_v"] = fn.solve_v(weight_orig, state_dict[key + "_u"], sigma)


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None, *, backend: str | None = None) -> nn.Module:
    """Applies spectral normalization to ``module.<name>`` with a forward pre-hook (torch's
    older API): before every forward, ``module.<name>`` = ``<name>_orig`` / sigma.

    Same arguments and semantics as torch.nn.utils.spectral_norm: ``dim`` defaults to 0, or
    1 for ConvTranspose1d/2d/3d; in training mode each forward runs ``n_power_iterations``
    of v <- normalize(M^T u), u <- normalize(M v) on the ``<name>_u`` / ``<name>_v`` buffers
    first. Returns ``module``. ``backend`` (keyword only) picks ganops' implementation.
    """
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    SpectralNorm.apply(module, name, n_power_iterations, dim, eps, backend)
    return module


def _hook_of(entry):
    # Load-state-dict pre-hooks are stored wrapped (torch's _WrappedHook keeps the callable as .hook).
    return getattr(entry, "hook", entry)


def remove_spectral_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Removes the spectral-norm hook of ``module.<name>`` (registered by ganops or by torch's
    hook API): ``<name>`` becomes a Parameter again, holding ``<name>_orig`` / sigma with the
    current u and v, and ``<name>_orig``, ``<name>_u``, ``<name>_v`` and the state-dict hooks go."""
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, _torch_hook_api.SpectralNorm) and hook.name == name:
            hook.remove(module)
            del module._forward_pre_hooks[key]
            break
    else:
        raise ValueError(f"spectral_norm of '{name}' not found in {module}")
    for hooks, kind in ((module._state_dict_hooks, _torch_hook_api.SpectralNormStateDictHook),
                        (module._load_state_dict_pre_hooks, _torch_hook_api.SpectralNormLoadStateDictPreHook)):
        for key, entry in list(hooks.items()):
            if isinstance(_hook_of(entry), kind) and _hook_of(entry).fn.name == name:
                del hooks[key]
                break
    return module
