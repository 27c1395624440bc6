"""MFAC's host synchronizations (issue 17): a steady-state step decided on the device.

Oracles: today's code (06f44c7: the host-decided step; its results recorded below, ``TODAY``),
the dense float64 solve ``F^{-1} g`` with ``F = damp I + G^T G / m`` of the stored window,
and "a skipped step never happened" (a twin run without that step).
"""

import copy
import io

import pytest
import torch
from torch import nn

from tests._sync import SyncCounter
from torchsteer.linalg.gradient_window import GradientWindow
from torchsteer.optim import MFAC

F64 = torch.float64
BASE = dict(lr=0.05, ngrads=8, damp=1e-3)
CONFIGS = {  # name: (dtype, options, the step whose gradient gets a NaN)
    "f64": (torch.float64, {}, None),
    "f32": (torch.float32, {}, None),
    "f32_momentum_wd": (torch.float32, dict(momentum=0.9, weight_decay=1e-2), None),
    "f32_skip_nan": (torch.float32, dict(nonfinite="skip", momentum=0.5), 7),
    "f64_blocked_skip_nan": (torch.float64, dict(nonfinite="skip", block_size=10), 12),
    "f32_blocked": (torch.float32, dict(block_size=10), None),
}
# today's code (06f44c7) on _trajectory(name): final parameters, then the state's summary
# fmt: off
TODAY = {
    "f64": ([
        -0.022184762118866042, 0.47164841734425306, -0.8254266894725422, -0.1032674967584235,
        0.09208220503092968, -0.4084597750063086, 0.2890677170773192, -0.48849017491552343,
        0.2006283883527921, 0.037021955933072614, 0.16888055001161498, -0.36372436923057994,
        -0.2774278760179638, -1.2687472016477221, -0.4773866201285931, -0.12148647775441339,
        -0.18506176721147585, 0.12092624289658313, -0.6693546008157046, 0.6447452571097412,
        -0.329967239426211, 0.4265889418883271, 0.8738756906296654, 0.18587285395155725,
        -0.7493656655762786, 0.7011646768095777, 1.6051671884750855, -2.5262898646570897,
        -0.40295031850527874, 0.628368340528887, 0.2873170169343559, 2.133605515920681,
        -2.2444377118624264, -0.2606615282709678, -0.6511832738087033, -0.4459246382890536,
        0.17698772914784935,
    ], {"step": [20.0], "skipped_steps": [0.0], "window_index": [4.0],
        "window_count": [8.0], "window_since_refresh": [4.0],
        "gram_sum": 830.9822890355631, "inverse_sum": 2.024662115520104}),
    "f32": ([
        -0.02215571328997612, 0.4715891480445862, -0.8253961205482483, -0.103253573179245,
        0.09210185706615448, -0.40859368443489075, 0.2887868285179138, -0.488369345664978,
        0.20041832327842712, 0.03695846349000931, 0.16875135898590088, -0.3637097477912903,
        -0.27738967537879944, -1.2687219381332397, -0.47745925188064575, -0.12149301171302795,
        -0.185067281126976, 0.12096250057220459, -0.6693505048751831, 0.6446517109870911,
        -0.3299967646598816, 0.42667797207832336, 0.8738393783569336, 0.18595410883426666,
        -0.7494027614593506, 0.7011643648147583, 1.605080485343933, -2.526437282562256,
        -0.4029359817504883, 0.6283099055290222, 0.28717127442359924, 2.1333184242248535,
        -2.2446327209472656, -0.26061341166496277, -0.6513285636901855, -0.4460223615169525,
        0.1770602911710739,
    ], {"step": [20.0], "skipped_steps": [0.0], "window_index": [4.0],
        "window_count": [8.0], "window_since_refresh": [4.0],
        "gram_sum": 831.072707682848, "inverse_sum": 2.0236898174137523}),
    "f32_momentum_wd": ([
        0.15073400735855103, 0.44005343317985535, -0.48315247893333435, -0.761146068572998,
        0.3945513069629669, -0.9040172100067139, -0.6976932883262634, -1.3935695886611938,
        0.11518722772598267, -0.8025301098823547, 0.26260194182395935, 0.32216963171958923,
        0.5575947761535645, -0.25044703483581543, 0.5457486510276794, -0.053143419325351715,
        0.5144945383071899, 1.2679294347763062, -0.8871818780899048, 0.10022462904453278,
        -0.06437627971172333, 0.41135135293006897, 0.11478781700134277, -0.43112316727638245,
        -0.6260729432106018, -0.5833677053451538, 0.3168278634548187, -0.8501669764518738,
        -0.5536972880363464, 0.5336135029792786, -0.7989838123321533, 0.9445562958717346,
        -2.4916610717773438, 0.6196977496147156, -1.6443322896957397, -0.36515936255455017,
        0.12508055567741394,
    ], {"step": [20.0], "skipped_steps": [0.0], "window_index": [4.0],
        "window_count": [8.0], "window_since_refresh": [4.0],
        "gram_sum": 29.438109755516052, "inverse_sum": 20.666635725317892}),
    "f32_skip_nan": ([
        -0.3616856336593628, 0.24879570305347443, -1.0746688842773438, -0.5012484192848206,
        0.6061155796051025, -0.9295984506607056, -1.7339752912521362, 0.4454987645149231,
        1.0691697597503662, -0.6994924545288086, 0.3746475875377655, 0.5240662693977356,
        -0.9592688083648682, -0.613857090473175, 0.7505750060081482, -0.7889487147331238,
        -0.8452814221382141, -0.196855828166008, -1.4007337093353271, 0.515269935131073,
        -0.41677433252334595, -0.15533693134784698, 0.5633835196495056, 0.3004029393196106,
        -0.13776510953903198, 0.3270963132381439, -0.034674979746341705, -0.7071571946144104,
        -0.4794946312904358, -0.21008914709091187, -0.4057363271713257, 1.0042436122894287,
        -1.104653000831604, 0.7582482695579529, -0.9051396250724792, 0.10450538247823715,
        0.640825629234314,
    ], {"step": [19.0], "skipped_steps": [1.0], "window_index": [3.0],
        "window_count": [8.0], "window_since_refresh": [3.0],
        "gram_sum": 13.103716785088181, "inverse_sum": 44.09019047580698}),
    "f64_blocked_skip_nan": ([
        1.293591082169792, 2.6475470880384617, -1.4207487238919028, -0.08269844549688857,
        -2.8201721951918484, -0.9339954794454638, -1.8546353224107848, -1.0421385145021236,
        -0.0742572224327158, 0.26584743989568954, -1.125627309276252, 1.2329272922599586,
        -2.510909314340235, 0.412520843439588, 0.33982585288172795, 0.948122637978322,
        1.4618400089731152, 1.8686784791750455, -2.590498547948646, 4.184510241986219,
        -0.4355863675952627, 2.017920352429856, -0.5942108588569207, -0.6649847378042967,
        -0.8733757204891588, 0.955631781026871, 0.5533704928550075, 1.5169673508066728,
        0.375665574256598, -0.5126145970337346, -0.05242892813369087, 0.7304134374460888,
        0.23255504757675644, -0.1935044290075122, -0.47141448984512835, 0.03829518541071873,
        0.14903925843208968,
    ], {"step": [19.0], "skipped_steps": [1.0], "window_index": [3.0],
        "window_count": [8.0], "window_since_refresh": [3.0, 3.0, 3.0, 3.0],
        "gram_sum": 29.26863935649982, "inverse_sum": 1252.3222240090104}),
    "f32_blocked": ([
        1.759877324104309, 2.4980781078338623, -0.9094335436820984, -0.13324762880802155,
        -2.653346061706543, -0.5844141840934753, -0.5924679636955261, -1.3997883796691895,
        0.6832697987556458, 0.26443758606910706, -1.2481656074523926, 1.020309329032898,
        -2.8206536769866943, 0.16296397149562836, 0.6762019395828247, 0.9693995118141174,
        0.19941829144954681, 1.67006516456604, -3.126241445541382, 3.6733787059783936,
        -0.2626016139984131, 2.1507978439331055, -0.17093443870544434, -0.9782038331031799,
        -1.0366556644439697, 1.6725175380706787, 0.322803258895874, 1.1689919233322144,
        0.21628771722316742, -1.0609327554702759, -0.7601926326751709, -0.21313662827014923,
        -0.9968187212944031, -0.5086520910263062, -0.06699822843074799, 0.025555264204740524,
        -0.22843003273010254,
    ], {"step": [20.0], "skipped_steps": [0.0], "window_index": [4.0],
        "window_count": [8.0], "window_since_refresh": [4.0, 4.0, 4.0, 4.0],
        "gram_sum": 23.889937861356884, "inverse_sum": 1086.01973811781}),
}
# fmt: on
SUMMARY = ("step", "skipped_steps", "window_index", "window_count", "window_since_refresh")


def _problem(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=gen).to(dtype)
    y = torch.randn(16, 2, generator=gen).to(dtype)
    return model, x, y


def _backward(model, x, y):
    model.zero_grad()
    (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()


def _trajectory(name, steps=20, omit_nan_step=False, **extra):
    """20 steps of CONFIGS[name] (a NaN gradient at its step, or that step left out)."""
    dtype, options, nan_at = CONFIGS[name]
    model, x, y = _problem(dtype)
    opt = MFAC(model.parameters(), **{**BASE, **options, **extra})
    for t in range(steps):
        _backward(model, x, y)
        if t == nan_at:
            if omit_nan_step:
                continue
            model[0].weight.grad[0, 0] = float("nan")
        opt.step()
    return model, opt


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(F64)


def _summary(opt):
    st = opt.state_dict()["state"][0]
    out = {k: [float(v) for v in st[k].reshape(-1)] for k in SUMMARY}
    out["gram_sum"] = float(st["window_gram"].to(F64).sum())
    out["inverse_sum"] = float(st["window_inverse"].to(F64).sum())
    return out


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_state_dicts_equal(a, b):
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        assert a["state"][pid].keys() == b["state"][pid].keys()
        for key, value in a["state"][pid].items():
            other = b["state"][pid][key]
            assert value.dtype == other.dtype and torch.equal(value.cpu(), other.cpu()), key


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    "extra",
    [
        {},
        dict(capturable=True),
        dict(capturable=True, nonfinite="skip"),
        dict(capturable=True, nonfinite="skip", check_every=3),
    ],
    ids=["default", "capturable", "capturable-skip", "capturable-skip-every3"],
)
def test_trajectories_equal_todays_code(name, extra):
    """Bit for bit on this machine; the tolerance allows another BLAS's rounding. The
    step counter, ring position and refresh counters equal today's exactly (with a NaN
    gradient: the refresh comes one step later, as today)."""
    dtype = CONFIGS[name][0]
    model, opt = _trajectory(name, **extra)
    want, summary = TODAY[name]
    want = torch.tensor(want, dtype=F64)
    tol = 1e-12 if dtype == F64 else 1e-6
    assert float((_flat(model) - want).abs().max() / want.abs().max()) <= tol
    got = _summary(opt)
    assert {k: got[k] for k in SUMMARY} == {k: summary[k] for k in SUMMARY}
    for key in ("gram_sum", "inverse_sum"):
        assert got[key] == pytest.approx(summary[key], rel=tol)


@pytest.mark.parametrize("name", ["f32_skip_nan", "f64_blocked_skip_nan"])
def test_a_nan_gradient_mid_trajectory_is_as_if_the_step_never_happened(name):
    """Capturable, nothing read at the NaN step: parameters and the whole state_dict equal
    a twin run that never took that step (but for skipped_steps), and the default
    (host-decided) run's state_dict."""
    model, opt = _trajectory(name, capturable=True)
    twin, twin_opt = _trajectory(name, capturable=True, omit_nan_step=True)
    host, host_opt = _trajectory(name)
    assert torch.equal(_flat(model), _flat(twin)) and torch.equal(_flat(model), _flat(host))
    sd, sd_twin = opt.state_dict(), twin_opt.state_dict()
    assert float(sd["state"][0]["skipped_steps"]) == 1.0
    assert float(sd_twin["state"][0]["skipped_steps"]) == 0.0
    sd_twin["state"][0]["skipped_steps"] = sd["state"][0]["skipped_steps"]
    _assert_state_dicts_equal(sd, sd_twin)
    _assert_state_dicts_equal(sd, host_opt.state_dict())


@pytest.mark.parametrize("block_size", [None, 10])
@pytest.mark.parametrize(
    ("extra", "most"),
    [
        (dict(capturable=True, nonfinite="skip"), 0),
        (dict(capturable=True), 1),
        ({}, 1),
        (dict(nonfinite="skip"), 1),
    ],
)
def test_steady_state_step_syncs(block_size, extra, most):
    """The third step: 0 host synchronizations with capturable=True and nonfinite="skip"
    (nothing is read), else the one read of the report (verdict and checks together)."""
    model, x, y = _problem(torch.float32)
    opt = MFAC(model.parameters(), **BASE, block_size=block_size, **extra)
    for _ in range(2):
        _backward(model, x, y)
        opt.step()
    _backward(model, x, y)
    with SyncCounter() as c:
        opt.step()
    assert c.total == most, c.counts


def test_raise_reads_once_and_a_nan_changes_nothing():
    model, opt = _trajectory("f32", steps=5, capturable=True)
    x, y = _problem(torch.float32)[1:]
    before, sd = _flat(model), copy.deepcopy(opt.state_dict())
    _backward(model, x, y)
    model[2].bias.grad[1] = float("inf")
    with SyncCounter() as c, pytest.raises(ValueError, match="NaN/Inf"):
        opt.step()
    assert c.total == 1
    assert torch.equal(_flat(model), before)
    _assert_state_dicts_equal(opt.state_dict(), sd)


@pytest.mark.parametrize("save_capturable", [False, True])
def test_resume_both_ways_continues_bit_for_bit(save_capturable):
    """A save of either form resumes in the other; a save without the new keys loads."""
    model, opt = _trajectory("f32_skip_nan", steps=11, capturable=save_capturable)
    sd = _roundtrip(opt.state_dict())
    x, y = _problem(torch.float32)[1:]
    resumed = copy.deepcopy(model)
    other = MFAC(resumed.parameters(), **{**BASE, **CONFIGS["f32_skip_nan"][1]},
                 capturable=not save_capturable)  # fmt: skip
    old = copy.deepcopy(sd)
    for group in old["param_groups"]:
        del group["capturable"], group["check_every"]
    other.load_state_dict(old if save_capturable else sd)
    assert other.capturable is (not save_capturable)  # a policy: the live value is kept
    for _ in range(9):
        for m, o in ((model, opt), (resumed, other)):
            _backward(m, x, y)
            o.step()
    assert torch.equal(_flat(model), _flat(resumed))
    _assert_state_dicts_equal(opt.state_dict(), other.state_dict())


def _near_duplicates(d, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g0 = 10.0 * torch.randn(d, generator=gen)
    return [g0 * (1 + 1e-6 * torch.randn(d, generator=gen)) for _ in range(n)]


@pytest.mark.parametrize("block_size", [None, 300])
def test_near_duplicates_unread_steps_are_held_never_uphill(block_size):
    """Capturable, skip: a flagged step between reads is held (parameters unchanged); the
    first read (``check_every`` steps) repairs the window and switches its Gram to float64,
    after which every step is read and steps downhill along the dense float64 solve."""
    m, d, damp, every = 64, 600, 1e-5, 6
    p = torch.nn.Parameter(torch.zeros(d))
    opt = MFAC([p], lr=1.0, ngrads=m, damp=damp, block_size=block_size, nonfinite="skip",
               capturable=True, check_every=every)  # fmt: skip
    held = []
    for t, g in enumerate(_near_duplicates(d, 40)):
        before = p.detach().to(F64).clone()
        p.grad = g.clone()
        opt.step()
        step = p.detach().to(F64) - before
        slope = float(g.to(F64) @ step)
        assert slope <= 0.0
        if slope == 0.0:
            held.append(t)
            continue
        window = opt._window
        blocks = window.blocks if block_size else [window]
        lo = 0
        for blk in blocks:
            hi = lo + blk.dim
            w = blk.grads.to(F64)
            f = damp * torch.eye(blk.dim, dtype=F64) + w.T @ w / m
            want = -torch.linalg.solve(f, g[lo:hi].to(F64))
            assert float((step[lo:hi] - want).norm() / want.norm()) < 1e-2
            lo = hi
    assert held == list(range(1, every - 1))  # step 0 is fine; steps 1.. until the read
    assert opt._window.gram_rebuilds >= 1 and float(opt.state[p]["step"]) == 40


def test_a_checkpoint_repairs_held_steps_so_the_resumed_run_continues_as_the_live_one():
    d, m = 600, 64
    grads = _near_duplicates(d, 12)
    p = torch.nn.Parameter(torch.zeros(d))
    opt = MFAC([p], lr=1.0, ngrads=m, nonfinite="skip", capturable=True)
    for g in grads[:4]:  # steps 1-3 held, nothing read yet
        p.grad = g.clone()
        opt.step()
    assert bool(opt._window.pending[0])
    sd = _roundtrip(opt.state_dict())
    assert not bool(opt._window.pending[0]) and opt._window.repairs == 1
    q = torch.nn.Parameter(p.detach().clone())
    other = MFAC([q], lr=1.0, ngrads=m, nonfinite="skip", capturable=True)
    other.load_state_dict(sd)
    for g in grads[4:]:
        for param, o in ((p, opt), (q, other)):
            param.grad = g.clone()
            o.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_sync_free_step_body_matches_eager(dtype):
    """torch.compile(fullgraph=True) of the window update and the direction u = G^T x."""

    def body(window, g):
        x, report, apply = window.device_add(g)
        return window.grads.t() @ (x * apply).to(window.dtype), report

    gen = torch.Generator().manual_seed(0)
    eager = GradientWindow(6, 20, 1e-3, dtype=dtype)
    for _ in range(3):
        eager.add_and_coefficients(torch.randn(20, generator=gen, dtype=dtype))
    compiled_window = copy.deepcopy(eager)
    compiled = torch.compile(body, fullgraph=True, backend="inductor")
    for _ in range(9):  # wraps around the ring; a refresh falls due at the 6th update
        g = torch.randn(20, generator=gen, dtype=dtype)
        u, report = body(eager, g)
        uc, rc = compiled(compiled_window, g)
        tol = 1e-12 if dtype == F64 else 1e-5
        assert float((u - uc).norm()) <= tol * float(u.norm())  # u = 0 on a held step
        assert torch.equal(report[:6], rc[:6]) and torch.equal(report[8:], rc[8:])
        for a, b in ((eager.gram, compiled_window.gram), (eager.inverse, compiled_window.inverse)):
            assert float((a - b).norm() / a.norm()) <= tol
        assert torch.equal(eager.ring, compiled_window.ring)
        if bool(report[2]):  # a refresh is due: the host does it, in both
            for w in (eager, compiled_window):
                w.resolve(report.tolist(), None)
