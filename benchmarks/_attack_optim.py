"""Bad-input cases of the three optimizers: hyperparameters at construction, in param groups,
in ``add_param_group`` and in ``load_state_dict``; NaN/Inf in parameters, gradients and
losses; dtypes, frozen, empty and sparse parameters; closures of the wrong kind.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from _attack_common import add, bitwise_equal, defect, documented, expect_reject, held, snapshot

from torchsteer.optim import MFAC, RegularizedNewton, Sven

KIND = "bad input"
NAN, INF = float("nan"), float("inf")


def problem(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lin, tanh = torch.nn.Linear, torch.nn.Tanh
    # the 32 x 32 layer is one Sven keeps as factors (jacobian/factored.py: in * out >= 1024)
    model = torch.nn.Sequential(lin(4, 32), tanh(), lin(32, 32), tanh(), lin(32, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model = model.to(dtype)
    x = torch.randn(12, 4, generator=g).to(dtype)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, x, y


def mfac_step(opt, model, x, y, poison=None):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if poison is not None:
        poison(model)
    return opt.step()


def sven_step(opt, model, x, y, poison=None):
    def closure():
        opt.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        return poison(losses) if poison is not None else losses

    return opt.step(closure)


def newton_step(opt, model, x, y, poison=None):
    def closure():
        loss = F.cross_entropy(model(x), y)
        return poison(loss) if poison is not None else loss

    return opt.step(closure)


OPTIMIZERS = {
    "MFAC": (lambda ps, **kw: MFAC(ps, **{"lr": 1e-2, "ngrads": 4, **kw}), mfac_step),
    "Sven": (lambda ps, **kw: Sven(ps, **{"lr": 0.1, "rank": 8, **kw}), sven_step),
    "RegularizedNewton": (lambda ps, **kw: RegularizedNewton(ps, **kw), newton_step),
}

# hyperparameter -> domain: pos (> 0), nonneg, unit [0, 1), frac (0, 1], open (0, 1),
# posint, nonnegint, int, choice:<a>|<b>, bool, dtype
DOMAINS = {
    "MFAC": {
        "lr": "nonneg",
        "ngrads": "posint",
        "damp": "pos",
        "momentum": "unit",
        "weight_decay": "nonneg",
        "nonfinite": "choice",
        "block_size": "posint",
        "memory_budget": "pos",
        "maximize": "bool",
        "window_dtype": "dtype",
        "shard": "bool",
    },
    "Sven": {
        "lr": "nonneg",
        "momentum": "unit",
        "rank": "posint",
        "rtol": "unit",
        "kappa": "pos",
        "svd": "choice",
        "jacobian": "choice",
        "oversample": "nonnegint",
        "power_iters": "nonnegint",
        "param_fraction": "frac",
        "microbatch_size": "posint",
        "nonfinite": "choice",
        "memory_budget": "posint",
        "seed": "int",
        "gram_dtype": "dtype",
        "damping": "nonneg",
        "max_step_norm": "pos",
        "maximize": "bool",
    },
    "RegularizedNewton": {
        "curvature": "choice",
        "regularization": "choice",
        "gamma0": "pos",
        "growth": "choice",
        "max_tries": "posint",
        "solver": "choice",
        "cg_tol": "open",
        "cg_maxiter": "posint",
        "cg_check_every": "posint",
        "nonfinite": "choice",
        "reuse_trial": "bool",
        "lr": "nonneg",
    },
}
PER_GROUP = {
    "MFAC": ("lr", "momentum", "weight_decay"),
    "Sven": ("lr", "momentum"),
    "RegularizedNewton": ("lr",),
}
GLOBAL_IN_GROUP = {"MFAC": ("ngrads", 7), "Sven": ("rank", 3), "RegularizedNewton": ("gamma0", 3.0)}


def bad_values(domain):
    """(label, value) pairs that the domain must refuse."""
    if domain == "choice":
        return [("bogus str", "bogus"), ("int", 3)]
    if domain == "bool":
        return [("str", "yes"), ("float", 0.5), ("nan", NAN)]
    if domain == "dtype":
        return [("int32", torch.int32), ("str", "float32"), ("complex64", torch.complex64)]
    out = [
        ("nan", NAN),
        ("inf", INF),
        ("str", "x"),
        ("bool", True),
        ("tensor (2,)", torch.tensor([1.0, 2.0])),
    ]
    out += {
        "pos": [("0", 0.0), ("-1", -1.0)],
        "nonneg": [("-1", -1.0)],
        "unit": [("-0.5", -0.5), ("1.5", 1.5)],
        "frac": [("0", 0.0), ("1.5", 1.5)],
        "open": [("0", 0.0), ("1.5", 1.5)],
        "posint": [("0", 0), ("-1", -1), ("2.5", 2.5)],
        "nonnegint": [("-1", -1), ("2.5", 2.5)],
        "int": [("2.5", 2.5)],
    }[domain]
    return out


def _construct_case(name, hp, value):
    make, _ = OPTIMIZERS[name]

    def run():
        model, _x, _y = problem()
        return expect_reject(lambda: make(model.parameters(), **{hp: value}), names=(hp,))

    return run


def _group_case(name, hp, value, via):
    make, step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        first, second = list(model[0].parameters()), list(model[-1].parameters())
        if via == "constructor group":
            return expect_reject(
                lambda: make([{"params": first}, {"params": second, hp: value}]), names=(hp,)
            )
        opt = make(first)
        if name != "MFAC":  # MFAC refuses any group after its first step (documented)
            step(opt, model, x, y)
        return expect_reject(
            lambda: opt.add_param_group({"params": second, hp: value}),
            state=lambda: (model, opt),
            names=(hp,),
            accepted=lambda _: defect(f"add_param_group accepted {hp}={value!r}"),
        )

    return run


def _load_case(name, corrupt, label):
    make, step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        twin_model, _, _ = problem()
        opt, twin = make(model.parameters()), make(twin_model.parameters())
        for o, m in ((opt, model), (twin, twin_model)):
            step(o, m, x, y)
            step(o, m, x, y)
        bad = corrupt(copy.deepcopy(opt.state_dict()), model)
        v = expect_reject(
            lambda: opt.load_state_dict(bad),
            state=lambda: (model, opt),
            accepted=lambda _: documented("accepted: must step like the twin"),
        )
        if v.status == "defect":
            return v
        try:  # the optimizer still steps like its twin that never saw the bad state
            step(opt, model, x, y)
            step(twin, twin_model, x, y)
        except Exception as exc:
            return defect(f"after a refused load, step raises {type(exc).__name__}: {exc}"[:150])
        if not bitwise_equal(snapshot(model), snapshot(twin_model)):
            return defect("after the load the next step differs from the untouched twin")
        if v.status != "held":
            return (
                defect(f"load accepted {label}")
                if "group without" not in label
                else documented(
                    "a group without lr is filled from defaults, as older saves are "
                    "(docs/optimizer_contract.md: loads older saves); steps like the twin"
                )
            )
        return v

    return run


def _first_state(sd):
    return sd["state"][min(sd["state"])]


def _tensor_keys(sd):
    return [k for k, v in _first_state(sd).items() if isinstance(v, torch.Tensor) and v.dim() > 0]


def corruptions():
    def group_value(key, value):
        def f(sd, model):
            sd["param_groups"][0][key] = value
            return sd

        return f, f"param group {key}={value!r}"

    def shrink_tensor(sd, model):
        st = _first_state(sd)
        keys = _tensor_keys(sd)
        if keys:
            st[keys[0]] = st[keys[0]].reshape(-1)[:-1].clone()
        else:
            st["step"] = torch.zeros(3)
        return sd

    def nan_tensor(sd, model):
        st = _first_state(sd)
        keys = [
            k
            for k, v in st.items()
            if isinstance(v, torch.Tensor)
            and v.is_floating_point()
            and k not in ("step", "skipped_steps")
        ]
        if keys:
            st[keys[0]] = torch.full_like(st[keys[0]], NAN)
        else:  # a float counter (RegularizedNewton's gamma)
            key = next(k for k, v in st.items() if isinstance(v, float))
            st[key] = NAN
        return sd

    def other_model(sd, model):
        big = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
        return sd | {"other": big}  # replaced below per optimizer

    def drop_group_key(sd, model):
        del sd["param_groups"][0]["lr"]
        return sd

    def string_step(sd, model):
        _first_state(sd)["step"] = "three"
        return sd

    out = [
        group_value("lr", NAN),
        group_value("lr", -1.0),
        group_value("lr", "x"),
        group_value("nonfinite", "bogus"),
    ]
    out += [
        (shrink_tensor, "a state tensor of the wrong shape"),
        (nan_tensor, "a state tensor full of NaN"),
        (drop_group_key, "a param group without lr"),
        (string_step, "step counter 'three'"),
    ]
    return out


def _other_model_case(name):
    make, step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        big = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))
        kw = {"momentum": 0.5} if name != "RegularizedNewton" else {}
        other = make(big.parameters(), **kw)
        step(other, big, x, y)
        opt = make(model.parameters(), **kw)
        step(opt, model, x, y)

        def accepted(_):
            step(opt, model, x, y)  # RegularizedNewton's state holds no per-parameter shapes
            return held("no shape-dependent state: the load is harmless, the next step runs")

        return expect_reject(
            lambda: opt.load_state_dict(other.state_dict()),
            state=lambda: (model, opt),
            accepted=accepted,
        )

    return run


def _global_changed_case(name):
    make, step = OPTIMIZERS[name]
    hp, value = GLOBAL_IN_GROUP[name]

    def run():
        model, x, y = problem()
        opt, other = make(model.parameters()), make(model.parameters(), **{hp: value})
        step(opt, model, x, y)
        sd = other.state_dict()
        state_before = snapshot(model, opt)
        try:
            opt.load_state_dict(sd)
        except Exception as exc:
            if not bitwise_equal(state_before, snapshot(model, opt)):
                return defect(f"state changed after {type(exc).__name__}")
            return held(f"{type(exc).__name__}: {exc}"[:120])
        got = opt.param_groups[0][hp]
        if got != value:
            return defect(f"load_state_dict kept {hp}={got!r}, the saved {value!r} lost")
        return held(f"loading another {hp} adopts it ({hp}={got!r}), as torch.optim does")

    return run


# ---- NaN / Inf, dtypes, frozen, empty, sparse ------------------------------------------------


def _poison_grad(value):
    def poison(model):
        model[0].weight.grad[0, 0] = value

    return poison


def _poison_loss(value, name):
    def poison(loss):
        if name == "Sven":
            return loss * torch.tensor([value] + [1.0] * (loss.numel() - 1))
        return loss * value

    return poison


def _nonfinite_case(name, value, policy, where):
    make, step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        opt = make(model.parameters(), nonfinite=policy)
        step(opt, model, x, y)
        if where == "param":
            with torch.no_grad():
                model[-1].bias[0] = value  # the logits: the loss sees it
        poison = None
        if where == "grad":
            poison = _poison_grad(value)
        elif where == "loss":
            poison = _poison_loss(value, name)
        before = snapshot(model, opt)
        try:
            step(opt, model, x, y, poison)
        except Exception as exc:
            after = snapshot(model, opt)
            ok = isinstance(exc, ValueError) and any(
                w in str(exc).lower() for w in ("nan", "inf", "finite")
            )
            if not bitwise_equal(before, after):
                return defect(f"state changed after {type(exc).__name__}: {exc}"[:150])
            if policy == "skip":
                return defect(f"nonfinite='skip' raised {type(exc).__name__}: {exc}"[:150])
            return (
                held(f"{type(exc).__name__}: {exc}"[:110])
                if ok
                else defect(f"unclear {type(exc).__name__}: {exc}"[:150])
            )
        if policy == "raise":
            return defect(f"non-finite {where} accepted with nonfinite='raise'")
        after = snapshot(model)
        if not bitwise_equal(before[0], after[0]):
            return defect("nonfinite='skip' moved the parameters")
        if not all(torch.isfinite(p).all() for p in model.parameters() if where != "param"):
            return defect("parameters non-finite after a skipped step")
        return held("skipped, parameters bit for bit unchanged")

    return run


def _dtype_case(name, dtype):
    make, step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        if dtype.is_complex:
            w = torch.randn(3, 4, dtype=dtype, requires_grad=True)
            opt = None

            def go():
                o = make([w])
                if name == "MFAC":
                    w.grad = torch.randn_like(w)
                    return o.step()
                if name == "Sven":
                    return o.step(lambda: (w.abs() ** 2).sum(1))
                return o.step(lambda: (w.abs() ** 2).sum())

            return expect_reject(go, state=lambda: (w,), names=("complex",))
        model, x, y = problem(dtype=dtype)
        opt = make(model.parameters())
        before = snapshot(model)
        try:
            for _ in range(2):
                step(opt, model, x, y)
        except Exception as exc:
            from _attack_common import clear_error

            ok, why = clear_error(exc, (str(dtype).split(".")[-1], "dtype", "half", "precision"))
            return held(why) if ok else defect(why)
        moved = not bitwise_equal(before, snapshot(model))
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        if finite and moved:
            return held(f"steps in {dtype}, parameters finite")
        return defect(f"{dtype}: finite={finite} moved={moved}")

    return run


def _mixed_dtype_case(name):
    make, _step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        model[-1].double()

        def fwd_model(inp):  # float32 layers, then the float64 output layer
            return model[-1](model[:-1](inp).double())

        opt = make(model.parameters())
        before = snapshot(model)
        try:
            if name == "MFAC":
                opt.zero_grad()
                F.cross_entropy(fwd_model(x), y).backward()
                opt.step()
            elif name == "Sven":
                opt.step(lambda: F.cross_entropy(fwd_model(x), y, reduction="none"))
            else:
                opt.step(lambda: F.cross_entropy(fwd_model(x), y))
        except Exception as exc:
            from _attack_common import clear_error

            ok, why = clear_error(exc, ("dtype",))
            if not bitwise_equal(before, snapshot(model)):
                return defect(f"parameters changed after {why}")
            return held(why) if ok else defect(why)
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        return held("mixed float32/float64 steps") if finite else defect("mixed dtypes: NaN")

    return run


def _frozen_case(name):
    make, step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        model[0].weight.requires_grad_(False)
        frozen = model[0].weight.detach().clone()
        opt = make(model.parameters())
        try:
            for _ in range(2):
                step(opt, model, x, y)
        except Exception as exc:
            return defect(f"a frozen parameter in the list: {type(exc).__name__}: {exc}"[:150])
        if not torch.equal(frozen, model[0].weight):
            return defect("the frozen parameter moved")
        return held("frozen parameter untouched, the others stepped")

    return run


def _all_frozen_case(name):
    make, step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        model.requires_grad_(False)
        before = snapshot(model)

        def go():
            opt = make(model.parameters())
            if name == "MFAC":
                return opt.step()
            return step(opt, model, x, y)

        try:
            go()
        except Exception as exc:
            from _attack_common import clear_error

            ok, why = clear_error(exc, ("requires_grad", "frozen", "grad", "no parameter"))
            return held(why) if ok else defect(why)
        if not bitwise_equal(before, snapshot(model)):
            return defect("all-frozen parameters moved")
        return held("all parameters frozen: a no-op")

    return run


def _sparse_case():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MFAC(emb.parameters(), lr=0.1, ngrads=4)

    def go():
        opt.zero_grad()
        emb(torch.tensor([1, 2])).sum().backward()
        return opt.step()

    return expect_reject(go, state=lambda: (emb, opt), names=("sparse",))


def _empty_batch_case(name):
    make, step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        opt = make(model.parameters())
        step(opt, model, x, y)
        return expect_reject(
            lambda: step(opt, model, x[:0], y[:0]),
            state=lambda: (model, opt),
            names=("empty", "batch", "sample", "nan", "finite"),
        )

    return run


def _zero_size_param_case(name):
    make, _step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        extra = torch.nn.Parameter(torch.zeros(0))
        opt = make([*model.parameters(), extra])

        def go():
            for _ in range(2):
                if name == "MFAC":
                    opt.zero_grad()
                    (F.cross_entropy(model(x), y) + extra.sum()).backward()
                    opt.step()
                elif name == "Sven":
                    opt.step(lambda: F.cross_entropy(model(x), y, reduction="none") + extra.sum())
                else:
                    opt.step(lambda: F.cross_entropy(model(x), y) + extra.sum())

        try:
            go()
        except Exception as exc:
            from _attack_common import clear_error

            ok, why = clear_error(exc, ("empty", "zero", "size"))
            return held(why) if ok else defect(why)
        ok = all(torch.isfinite(p).all() for p in model.parameters())
        return held("a 0-element parameter is carried along") if ok else defect("NaN")

    return run


def _closure_kind_cases():
    """Closures returning the wrong thing."""
    cases = []

    def sven(ret, names):
        def run():
            model, x, y = problem()
            opt = Sven(model.parameters(), lr=0.1, rank=8)
            return expect_reject(
                lambda: opt.step(lambda: ret(model, x, y)), state=lambda: (model, opt), names=names
            )

        return run

    def ce(model, x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    cases += [
        (
            "Sven",
            "closure returns a scalar",
            sven(lambda m, x, y: ce(m, x, y).mean(), ("scalar", "per-sample", "(B,)")),
        ),
        (
            "Sven",
            "closure returns (B, 1)",
            sven(lambda m, x, y: ce(m, x, y)[:, None], ("shape", "per-sample", "1-d", "(B,)")),
        ),
        (
            "Sven",
            "closure returns detached losses",
            sven(lambda m, x, y: ce(m, x, y).detach(), ("grad", "graph")),
        ),
        ("Sven", "closure returns a float", sven(lambda m, x, y: 1.0, ("tensor", "closure"))),
        (
            "Sven",
            "closure returns int losses",
            sven(lambda m, x, y: ce(m, x, y).long(), ("dtype", "float", "grad")),
        ),
    ]

    def newton(ret, names, **kw):
        def run():
            model, x, y = problem()
            opt = RegularizedNewton(model.parameters(), **kw)
            return expect_reject(
                lambda: opt.step(lambda: ret(model, x, y)), state=lambda: (model, opt), names=names
            )

        return run

    cases += [
        (
            "RegularizedNewton",
            "hessian closure returns (B,)",
            newton(ce, ("scalar", "hessian", "per-sample")),
        ),
        (
            "RegularizedNewton",
            "hessian closure returns a float",
            newton(lambda m, x, y: 1.0, ("tensor", "closure", "scalar")),
        ),
        (
            "RegularizedNewton",
            "hessian closure returns detached",
            newton(lambda m, x, y: ce(m, x, y).mean().detach(), ("grad", "graph")),
        ),
        (
            "RegularizedNewton",
            "gauss_newton closure returns a scalar",
            newton(
                lambda m, x, y: ce(m, x, y).mean(),
                ("outputs", "gauss_newton", "tuple"),
                curvature="gauss_newton",
            ),
        ),
        (
            "RegularizedNewton",
            "empirical_fisher closure returns a scalar",
            newton(
                lambda m, x, y: ce(m, x, y).mean(),
                ("per-sample", "(B,)", "empirical"),
                curvature="empirical_fisher",
            ),
        ),
        (
            "RegularizedNewton",
            "no closure",
            lambda: expect_reject(
                lambda: RegularizedNewton(problem()[0].parameters()).step(None), names=("closure",)
            ),
        ),
        (
            "Sven",
            "no closure and no batch",
            lambda: expect_reject(
                lambda: Sven(problem()[0].parameters()).step(), names=("closure", "batch")
            ),
        ),
    ]
    return cases


def _maximize_case(name):
    make, step = OPTIMIZERS[name]

    def run():
        model, x, y = problem()
        opt = make(model.parameters(), maximize=True)
        with torch.no_grad():
            l0 = F.cross_entropy(model(x), y).item()
        for _ in range(3):
            step(opt, model, x, y)
        with torch.no_grad():
            l1 = F.cross_entropy(model(x), y).item()
        return (
            held(f"maximize raised the loss {l0:.3f} -> {l1:.3f}")
            if l1 > l0
            else defect(f"maximize=True lowered the loss {l0:.3f} -> {l1:.3f}")
        )

    return run


def register() -> None:
    for name, domains in DOMAINS.items():
        if name == "RegularizedNewton":
            domains = {**domains, "maximize": "bool"}
        for hp, domain in domains.items():
            for label, value in bad_values(domain):
                add(
                    KIND,
                    f"{name} constructor",
                    f"{hp}={label}",
                    _construct_case(name, hp, value),
                    f"{name}(model.parameters(), {hp}={value!r})",
                )
        for hp in PER_GROUP[name]:
            for label, value in bad_values(DOMAINS[name][hp]):
                for via in ("constructor group", "add_param_group"):
                    add(
                        KIND,
                        f"{name} {via}",
                        f"{hp}={label}",
                        _group_case(name, hp, value, via),
                        f"{name}: a param group with {hp}={value!r} ({via})",
                    )
        hp, value = GLOBAL_IN_GROUP[name]
        for via in ("constructor group", "add_param_group"):
            add(
                KIND,
                f"{name} {via}",
                f"global {hp} differs in a group",
                _group_case(name, hp, value, via),
                f"{name}: a group with {hp}={value}",
            )
        for corrupt, label in corruptions():
            add(
                KIND,
                f"{name} load_state_dict",
                label,
                _load_case(name, corrupt, label),
                f"{name}.load_state_dict(state with {label})",
            )
        add(
            KIND,
            f"{name} load_state_dict",
            "the state of another model",
            _other_model_case(name),
            f"{name}.load_state_dict(state of a wider model)",
        )
        add(
            KIND,
            f"{name} load_state_dict",
            f"a saved {GLOBAL_IN_GROUP[name][0]} differs",
            _global_changed_case(name),
            f"{name}: load a state saved with another global hparam",
        )
        wheres = ("grad", "param") if name == "MFAC" else ("loss", "param")
        for where in wheres:
            for vlabel, v in (("NaN", NAN), ("Inf", INF)):
                for policy in ("raise", "skip"):
                    add(
                        KIND,
                        f"{name} non-finite",
                        f"{vlabel} {where}, nonfinite={policy}",
                        _nonfinite_case(name, v, policy, where),
                        f"{name}(nonfinite={policy!r}): {vlabel} in the {where} at step 2",
                    )
        for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.complex64):
            add(
                KIND,
                f"{name} dtypes",
                str(dtype),
                _dtype_case(name, dtype),
                f"{name} on {dtype} parameters",
            )
        add(
            KIND,
            f"{name} dtypes",
            "float32 and float64 parameters",
            _mixed_dtype_case(name),
            f"{name} on a model whose last layer is float64",
        )
        add(
            KIND,
            f"{name} parameters",
            "one frozen parameter in the list",
            _frozen_case(name),
            f"{name}: model[0].weight.requires_grad_(False), params in the list",
        )
        add(
            KIND,
            f"{name} parameters",
            "all parameters frozen",
            _all_frozen_case(name),
            f"{name}: every parameter requires_grad=False",
        )
        add(
            KIND,
            f"{name} parameters",
            "a 0-element parameter",
            _zero_size_param_case(name),
            f"{name}: params + nn.Parameter(torch.zeros(0))",
        )
        add(
            KIND,
            f"{name} parameters",
            "maximize=True ascends",
            _maximize_case(name),
            f"{name}(maximize=True): loss must rise",
        )
        if name != "MFAC":
            add(
                KIND,
                f"{name} batch",
                "an empty batch",
                _empty_batch_case(name),
                f"{name}: step on x[:0], y[:0]",
            )
    add(
        KIND,
        "MFAC parameters",
        "sparse gradient (nn.Embedding(sparse=True))",
        _sparse_case,
        "MFAC on nn.Embedding(10, 4, sparse=True)",
    )
    add(
        KIND,
        "MFAC batch",
        "step with no gradients is a no-op",
        _mfac_no_grad,
        "MFAC: step() before any backward",
    )
    for name, label, fn in _closure_kind_cases():
        add(KIND, f"{name} closure", label, fn, f"{name}.step(closure) where {label}")
    _ = (math, documented)


def _mfac_no_grad():
    model, _x, _y = problem()
    opt = MFAC(model.parameters(), lr=0.1, ngrads=4)
    before = snapshot(model, opt)
    opt.step()
    if bitwise_equal(before[0], snapshot(model)[0]):
        return held("no .grad: parameters unchanged")
    return defect("step() without gradients moved parameters")
