"""The interactive explorer, driven headlessly: set widget values, click the button, scrub the trajectory slider and read
back what the callbacks set (PNG bytes on Image widgets, the status HTML, `Explorer.state`)."""
import pytest
import torch
from spruce_nb.explorer import Explorer, explore, held_out_phantoms

PNG = b'\x89PNG\r\n\x1a\n'

@pytest.fixture(scope='module')
def xp():
    return explore(n_images=2, steps=10, use_pti=False)    # zoo models, 2 held-out phantoms (normal, cardiomegaly)

def _explain(xp, image=1, steps=10, **lambdas):
    xp.image_select.value = image
    xp.steps.value = steps
    for k, v in lambdas.items(): getattr(xp, k).value = v
    xp.explain_button.click()
    return xp.explanation

def test_widgets_start_in_a_sensible_state(xp):
    assert xp.classes == ['normal', 'cardiomegaly']
    assert len(xp.image_select.options) == 2 and 'predicted' in xp.image_select.options[0][0]
    assert bytes(xp.original_view.value).startswith(PNG)
    assert xp.trajectory.disabled and xp.trajectory.max == 0 and xp.state['step'] is None
    xp.image_select.value = 1
    pred = int(xp.probs0[1].argmax())
    assert xp.target_select.value != pred                # defaults to the other (second most probable) class
    assert 'Explain' in xp.status.value

def test_explain_then_scrub_the_trajectory(xp):
    ex = _explain(xp, image=1, steps=40)
    assert ex is not None and xp.state['error'] is None
    T = xp.state['steps']
    assert T == 40 and (xp.trajectory.min, xp.trajectory.max) == (0, 40) and xp.play.max == 40 and not xp.trajectory.disabled
    assert xp.trajectory.value == T and xp.state['step'] == T          # shows the counterfactual end first
    c = xp.state['crossing_step']
    assert c == int(ex.crossing_step[0]) and c > 0, f'the zoo models should flip this phantom after step 0 (crossing {c})'
    views = {}
    for t in range(T + 1):
        xp.trajectory.value = t
        assert xp.state['step'] == t
        tgt = xp.target_select.value
        assert xp.state['p_target'] == pytest.approx(float(ex.probs[t, 0, tgt]))
        assert xp.state['kind'] == ('counterfactual' if int(ex.probs[t, 0].argmax()) == tgt else 'semifactual')
        views[t] = tuple(bytes(w.value) for w in (xp.step_view, xp.diff_view, xp.plot_view))
        assert all(v.startswith(PNG) for v in views[t])
    assert views[0][0] != views[T][0] and views[0][1] != views[T][1] and views[0][2] != views[T][2]
    # the status flips exactly at the crossing step
    xp.trajectory.value = c - 1
    assert xp.state['kind'] == 'semifactual' and 'semifactual' in xp.status.value and 'counterfactual' not in xp.status.value
    xp.trajectory.value = c
    assert xp.state['kind'] == 'counterfactual' and '<b>counterfactual</b>' in xp.status.value
    # frames are renders of the recorded latents: the ends are the explanation's reconstruction and counterfactual
    assert (xp.step_image(0) - ex.reconstruction[0]).abs().max() < 0.05
    assert (xp.step_image(T) - ex.counterfactual[0]).abs().max() < 0.05
    with pytest.raises(ValueError, match='outside the trajectory'): xp.step_image(T + 1)
    # difference to the reconstruction: zero at step 0
    xp.trajectory.value = 0; to_orig = bytes(xp.diff_view.value)
    xp.diff_to.value = 'reconstruction'
    assert bytes(xp.diff_view.value) != to_orig and xp.state['l1'] < 1e-3   # fp16 latents: not bit-exact
    xp.diff_to.value = 'original'

def test_target_equal_to_prediction_is_a_message_not_a_traceback(xp):
    _explain(xp, image=1, steps=4)
    xp.target_select.value = int(xp.probs0[1].argmax())
    assert 'press Explain' in xp.status.value                         # the shown trajectory is marked stale
    xp.explain_button.click()                                          # must not raise
    assert xp.explanation is None and xp.trajectory.disabled and xp.trajectory.max == 0
    assert 'already predicts' in xp.state['error'] and 'already predicts' in xp.status.value
    assert 'pick another target' in xp.status.value

def test_sliders_set_the_config_and_the_inversion_is_reused(xp, monkeypatch):
    sp = xp.spruce
    cfg0, calls = sp.base_config, []
    real = sp.invert
    monkeypatch.setattr(sp, 'invert', lambda x: calls.append(1) or real(x))
    xp._inversions.clear()
    _explain(xp, image=0, steps=3, lambda_perc=1.0, lambda_latent=1e-3, lambda_image=1e-5)
    _explain(xp, image=0, steps=5, lambda_perc=0.01)
    assert len(calls) == 1, 'changing λs or T must not invert the image again'
    c = xp.state['config']
    assert c['steps'] == 5 and xp.trajectory.max == 5
    # Spruce rescales the thesis-scale λs to the generator; the slider value is what it started from
    assert c['lambda_perc'] == pytest.approx(0.01)
    assert c['lambda_latent'] == pytest.approx(sp.base_config.replace(lambda_latent=1e-3).scaled_to(sp.resolution, sp.G.num_ws * sp.G.w_dim).lambda_latent)
    assert sp.base_config == cfg0 and sp.use_pti is False             # the explainer's own settings are restored

def test_a_strong_latent_weight_keeps_the_path_short(xp):
    d = {}
    for lam in (1e-4, 1e-1):
        e = _explain(xp, image=1, steps=6, lambda_latent=lam, lambda_perc=0.1)
        d[lam] = float((e.ws - e.ws_pivot).abs().sum())
    assert d[1e-1] < d[1e-4]

def test_pti_checkbox_inverts_with_pivotal_tuning(xp, monkeypatch):
    import spruce_nb.pti as pti
    seen = []
    real = pti.pivotal_tuning
    monkeypatch.setattr(pti, 'pivotal_tuning', lambda *a, **k: seen.append(k.get('cfg')) or real(*a, **k))
    monkeypatch.setattr(xp.spruce, 'pti_config', xp.spruce.pti_config.replace(steps=2))
    xp.use_pti.value = True
    try: e = _explain(xp, image=1, steps=3)
    finally: xp.use_pti.value = False
    assert len(seen) == 1 and seen[0].steps == 2 and e is not None and xp.trajectory.max == 3
    assert xp.spruce.use_pti is False and (1, True) in xp._inversions

def test_an_unexpected_error_is_shown_and_raised(xp, monkeypatch):
    def boom(*a, **k): raise RuntimeError('simulated failure')
    monkeypatch.setattr(xp.spruce, 'explain', boom)
    xp.image_select.value = 1
    with pytest.raises(RuntimeError, match='simulated'): xp.run()
    assert 'RuntimeError: simulated failure' in xp.status.value and not xp.explain_button.disabled

def test_user_images_and_bad_input(xp):
    x, y, names = held_out_phantoms(3, size=xp.spruce.resolution, classes=xp.classes, seed=7)
    own = Explorer(xp.spruce, x, names=['a', 'b', 'c'])
    assert [o[1] for o in own.image_select.options] == [0, 1, 2] and own.image_select.options[2][0].startswith('c ·')
    with pytest.raises(ValueError, match='resize them first'): Explorer(xp.spruce, torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match='names'): Explorer(xp.spruce, x, names=['a'])
    with pytest.raises(ValueError, match=r'\[-1, 1\]|range'): Explorer(xp.spruce, x * 3)
    with pytest.raises(ValueError, match='no explanation yet'): own.step_image(0)
    with pytest.raises(ValueError, match='no explanation yet'): own.filmstrip()
