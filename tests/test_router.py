"""Router closed forms: aux loss values, capacity and drops, k=1 weights, padding, fp32 scores."""

import math
from types import SimpleNamespace

import pytest
import torch

from trainer.config import ModelConfig, MoEConfig
from trainer.model import Transformer
from trainer.moe import MoE, Router
from trainer.moe.router import RoutingCounts, balance_losses, capacity


def route(router: Router, x: torch.Tensor, valid=None) -> SimpleNamespace:
    """The pure router plus what the MoE layer derives from it on one process."""
    routing = router(x, valid)
    counts = RoutingCounts.split(routing.local_counts)
    aux_loss, z_loss = balance_losses(routing, counts, 1, router.top_k)
    return SimpleNamespace(**vars(routing), aux_loss=aux_loss, z_loss=z_loss, routed_E=counts.routed_E,
                           dropped=counts.dropped, routes=counts.valid_tokens * router.top_k)


def router_with_identity_gate(E: int, K: int = 1, scale: float = 20.0, **kwargs) -> Router:
    """A router over D = E whose logits are `scale * x`: one-hot inputs pick their expert."""
    router = Router(E, E, K, **kwargs)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E) * scale)
    return router


def one_hot_tokens(experts: list[int], E: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(experts), E).float()


def test_balanced_routing_gives_aux_loss_of_exactly_one():
    E = 4
    router = router_with_identity_gate(E)
    routing = route(router, one_hot_tokens([0, 1, 2, 3] * 3, E))
    assert routing.routed_E.tolist() == [3, 3, 3, 3]
    assert routing.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_uniform_probabilities_with_balanced_choices_give_one_for_top2():
    E, K = 4, 2
    router = router_with_identity_gate(E, K, scale=0.0)  # every probability is exactly 1/E
    routing = route(router, torch.randn(8, E))
    # with f summing to 1 over all K choices, E * sum_i f_i * (1/E) is 1 whatever the choices
    assert routing.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_skewed_routing_gives_more_and_the_closed_form():
    E = 4
    router = router_with_identity_gate(E, scale=5.0)
    x = one_hot_tokens([0, 0, 0, 0, 0, 1], E)
    routing = route(router, x)
    probs = torch.softmax(x * 5.0, dim=-1)
    f = torch.tensor([5, 1, 0, 0]) / 6.0
    expected = E * (f * probs.mean(0)).sum()
    assert routing.aux_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert routing.aux_loss.item() > 1.5
    lse = torch.logsumexp(x * 5.0, dim=-1)
    assert routing.z_loss.item() == pytest.approx(lse.square().mean().item(), rel=1e-6)


def test_capacity_formula():
    n = torch.tensor(10)
    assert capacity(n, 1.0, 1, 4).item() == 3  # ceil(2.5)
    assert capacity(n, 1.1, 1, 1).item() == 11  # 1.1 * 10 is 11.000000000000002 in floating point
    assert capacity(n, 2.0, 2, 4).item() == 10
    assert capacity(torch.tensor(7), 1.25, 2, 8).item() == math.ceil(1.25 * 7 * 2 / 8)


def test_position_policy_drops_the_latest_tokens_beyond_capacity():
    E = 2
    router = router_with_identity_gate(E, capacity_factor=1.0)  # C = ceil(6 * 1 / 2) = 3
    routing = route(router, one_hot_tokens([0, 0, 1, 0, 0, 0], E))
    assert routing.keep_TK[:, 0].tolist() == [True, True, True, True, False, False]
    assert routing.dropped.item() == 2 and routing.routes.item() == 6
    assert routing.routed_E.tolist() == [5, 1]  # counts before drops


def test_probs_policy_keeps_the_most_confident_routes():
    E = 2
    router = router_with_identity_gate(E, capacity_factor=1.0, drop_policy="probs")
    x = one_hot_tokens([0, 0, 1, 0, 0, 0], E) * torch.tensor([0.1, 0.2, 1.0, 0.9, 0.8, 0.3])[:, None]
    routing = route(router, x)
    # expert 0 gets tokens 0,1,3,4,5 with confidence rising in x; the top three are 3, 4, 5
    assert routing.keep_TK[:, 0].tolist() == [False, False, True, True, True, True]
    assert routing.dropped.item() == 2


def test_first_choices_take_capacity_before_second_choices():
    E, K = 3, 2
    router = Router(E, E, K, capacity_factor=0.5)  # C = ceil(0.5 * 4 * 2 / 3) = 2
    with torch.no_grad():
        router.weight.copy_(torch.eye(E) * 10.0)
    # token 0, 1: first choice expert 2 and second expert 0; tokens 2, 3: first choice expert 0
    x = torch.tensor([[1.0, 0, 2.0], [1.0, 0, 2.0], [2.0, 0, 1.0], [2.0, 0, 1.0]])
    routing = route(router, x)
    assert routing.expert_idx_TK.tolist() == [[2, 0], [2, 0], [0, 2], [0, 2]]
    # each expert gets 2 first choices and 2 second choices for 2 slots: every first choice is kept
    # (token order alone would have given expert 0's slots to tokens 0 and 1's second choices)
    assert routing.keep_TK.tolist() == [[True, False]] * 4
    assert routing.dropped.item() == 4


def test_top1_keeps_raw_probability_and_topk_renormalises():
    x = torch.randn(5, 8)
    r1 = Router(8, 4, 1)
    r2 = Router(8, 4, 2)
    torch.nn.init.normal_(r1.weight)
    with torch.no_grad():
        r2.weight.copy_(r1.weight)
    probs = torch.softmax(x @ r1.weight.t(), dim=-1)
    assert torch.allclose(r1(x).weight_TK[:, 0], probs.max(-1).values)
    assert torch.allclose(r2(x).weight_TK.sum(-1), torch.ones(5))


def test_top1_router_learns_from_the_lm_objective_alone():
    layer = MoE(8, 16, 4, top_k=1)
    layer.init_weights(0)
    layer(torch.randn(6, 8)).out.sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_padding_changes_nothing(capacity_factor):
    torch.manual_seed(0)
    layer = MoE(16, 32, 4, top_k=2, capacity_factor=capacity_factor)
    layer.init_weights(3)
    x = torch.randn(10, 16)
    pads = torch.randn(7, 16) * 5
    plain = layer(x)
    padded = layer(torch.cat([x, pads]), torch.cat([torch.ones(10, dtype=torch.bool), torch.zeros(7, dtype=torch.bool)]))
    assert torch.equal(padded.out[:10], plain.out)
    assert torch.equal(padded.out[10:], torch.zeros(7, 16))
    assert padded.aux_loss.item() == pytest.approx(plain.aux_loss.item(), rel=1e-6)
    assert padded.z_loss.item() == pytest.approx(plain.z_loss.item(), rel=1e-6)
    assert torch.equal(padded.stats.routed_E, plain.stats.routed_E)
    assert padded.stats.dropped == plain.stats.dropped and padded.stats.routes == plain.stats.routes


def tiny_model(aux_loss_coef: float, z_loss_coef: float = 0.0) -> Transformer:
    model = Transformer(ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=8),
                        MoEConfig(num_experts=4, top_k=2, d_ff=32, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef))
    model.init_weights(0)
    return model


def test_router_gradient_depends_on_aux_coefficient_and_loss_adds_up():
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = {}
    for coef in (0.0, 0.5):
        model = tiny_model(coef, z_loss_coef=0.1)
        out = model(idx, idx)
        expected = out.lm_loss + coef * out.aux_loss + 0.1 * out.z_loss
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-7)
        out.loss.backward()
        grads[coef] = model.blocks[0].ffn.router.weight.grad.clone()
    assert not torch.allclose(grads[0.0], grads[0.5])
    # the aux part of the gradient is exactly linear in the coefficient
    model = tiny_model(1.0)
    model(idx, idx).aux_loss.backward()
    aux_grad = model.blocks[0].ffn.router.weight.grad
    torch.testing.assert_close(grads[0.5] - grads[0.0], 0.5 * aux_grad, rtol=1e-4, atol=1e-7)


def test_router_scores_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    router = Router(32, 8, 2)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(64, 32)
    plain = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = router(x)
    assert mixed.weight_TK.dtype == torch.float32 and mixed.prob_sum_E.dtype == torch.float32
    # identical choices and weights: bf16 logits would flip near-ties and round the weights
    assert torch.equal(mixed.expert_idx_TK, plain.expert_idx_TK)
    assert torch.equal(mixed.weight_TK, plain.weight_TK)


def test_aux_loss_is_averaged_over_layers_not_summed():
    model = Transformer(ModelConfig(d_model=16, n_layers=3, n_heads=2, seq_len=8),
                        MoEConfig(num_experts=4, top_k=2, d_ff=32))
    model.init_weights(0)
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.weight.zero_()  # uniform probabilities: each layer's aux loss is exactly 1
    out = model(torch.randint(0, 256, (2, 8)))
    assert len(model.moe_layers) == 3
    assert out.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_sigmoid_scores_choose_like_softmax_and_weigh_by_renormalised_sigmoid():
    E, K = 6, 3
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, E, generator=gen)
    softmax, sigmoid = Router(E, E, K), Router(E, E, K, score_func="sigmoid", route_scale=2.5)
    with torch.no_grad():
        softmax.weight.copy_(torch.randn(E, E, generator=gen))
        sigmoid.weight.copy_(softmax.weight)
    a, b = route(softmax, x), route(sigmoid, x)
    assert torch.equal(a.expert_idx_TK, b.expert_idx_TK)  # both monotonic in the logits
    logits = x @ sigmoid.weight.t()
    chosen = torch.sigmoid(logits).gather(1, b.expert_idx_TK)
    torch.testing.assert_close(b.weight_TK, 2.5 * chosen / chosen.sum(-1, keepdim=True))
    scores = torch.sigmoid(logits)
    torch.testing.assert_close(b.prob_sum_E, (scores / scores.sum(-1, keepdim=True)).sum(0))


def test_sigmoid_balanced_routing_gives_aux_loss_of_one_and_skewed_more():
    E = 4
    router = router_with_identity_gate(E, score_func="sigmoid")
    balanced = route(router, one_hot_tokens([0, 1, 2, 3] * 3, E))
    assert balanced.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    skewed = route(router, one_hot_tokens([0, 0, 0, 1] * 3, E))
    # sigmoid(20) ~ 1 and sigmoid(0) = 1/2: a token's normalised scores are 0.4 (its expert), 0.2 (others);
    # f = [3/4, 1/4, 0, 0], P_0 = (9 * 0.4 + 3 * 0.2) / 12 = 0.35, P_1 = 0.25: aux = 4 * (0.2625 + 0.0625)
    assert skewed.aux_loss.item() == pytest.approx(1.3, abs=1e-6)


def test_route_scale_scales_the_output_and_nothing_else():
    torch.manual_seed(0)
    x = torch.randn(20, 16)
    plain = MoE(16, 24, 4, top_k=2, layer_id=1)
    scaled = MoE(16, 24, 4, top_k=2, layer_id=1, route_scale=2.5)
    plain.init_weights(seed=3)
    scaled.init_weights(seed=3)
    a, b = plain(x), scaled(x)
    torch.testing.assert_close(b.out, 2.5 * a.out)
    assert torch.equal(a.aux_loss, b.aux_loss) and torch.equal(a.z_loss, b.z_loss)


def test_router_entropy_is_log_e_for_uniform_scores_and_zero_for_certain_ones():
    E = 8
    uniform = Router(E, E, 2)
    with torch.no_grad():
        uniform.weight.zero_()
    x = torch.randn(5, E)
    assert uniform(x).entropy_sum.item() == pytest.approx(5 * math.log(E), rel=1e-6)
    certain = router_with_identity_gate(E, scale=200.0)
    assert certain(one_hot_tokens([0, 3, 5], E)).entropy_sum.item() == pytest.approx(0.0, abs=1e-6)
    # padding adds nothing
    valid = torch.tensor([True, False, True, False, False])
    assert uniform(x, valid).entropy_sum.item() == pytest.approx(2 * math.log(E), rel=1e-6)


def skewed_layer(E: int = 8, D: int = 16) -> MoE:
    layer = MoE(D, 24, E, top_k=2, layer_id=0, expert_bias=True)
    layer.init_weights(seed=1)
    with torch.no_grad():
        layer.router.weight[0] += 0.1  # with positive inputs, experts 0 and 1 win most tokens
        layer.router.weight[1] += 0.06
    return layer


def load_cv(routed_E: torch.Tensor) -> float:
    load = routed_E.double()
    return (load.std(unbiased=False) / load.mean()).item()


def test_expert_bias_balances_a_skewed_router_without_any_aux_loss():
    layer = skewed_layer()
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0)).abs()
    first = load_cv(layer(x).stats.routed_E)
    layer.router.pending_counts_E.zero_()
    assert first > 1.0
    late = []
    for step in range(300):
        cv = load_cv(layer(x).stats.routed_E)  # training mode, gradients on: counted
        layer.router.finish_step(True, 0.01)
        if step >= 250:
            late.append(cv)
    # a fixed-size sign step keeps hovering around balance: judge the last 50 steps together
    assert sum(late) / len(late) < 0.25, (first, late)
    assert abs(layer.router.expert_bias_E.mean().item()) < 1e-6  # kept centred
    assert layer.router.weight.grad is None  # the bias moved, not the router weights


def test_expert_bias_chooses_experts_but_never_weighs_them():
    layer = skewed_layer()
    with torch.no_grad():
        layer.router.expert_bias_E.copy_(torch.linspace(-1, 1, 8))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    routing = layer.router(x)
    logits = x @ layer.router.weight.t()
    probs = torch.softmax(logits, -1)
    assert torch.equal(routing.expert_idx_TK, torch.topk(probs + layer.router.expert_bias_E, 2).indices)
    chosen = probs.gather(1, routing.expert_idx_TK)
    torch.testing.assert_close(routing.weight_TK, chosen / chosen.sum(-1, keepdim=True))


def test_eval_and_no_grad_forwards_do_not_move_the_expert_bias():
    layer = skewed_layer()
    x = torch.randn(64, 16)
    layer.eval()
    layer(x)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert int(layer.router.pending_counts_E.sum()) == 0
    layer.router.finish_step(True, 0.1)
    assert torch.equal(layer.router.expert_bias_E, torch.zeros(8))


def test_eval_capacity_applies_in_eval_only():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    capped = MoE(16, 24, 4, top_k=2, capacity_factor=0.5, layer_id=0)
    capped.init_weights(seed=0)
    assert int(capped(x).stats.dropped) > 0  # training: capacity 0.5
    capped.eval()
    assert int(capped(x).stats.dropped) == 0  # eval: moe.eval_capacity_factor=null, dropless
    capped_in_eval = MoE(16, 24, 4, top_k=2, capacity_factor=None, eval_capacity_factor=0.5, layer_id=0)
    capped_in_eval.init_weights(seed=0)
    assert int(capped_in_eval(x).stats.dropped) == 0
    capped_in_eval.eval()
    assert int(capped_in_eval(x).stats.dropped) > 0


def test_min_capacity_keeps_at_least_that_many_routes_per_expert():
    E = 4
    router = router_with_identity_gate(E, capacity_factor=0.01, min_capacity=3)  # ceil(0.01 * 8 / 4) = 1
    routing = route(router, one_hot_tokens([0] * 5 + [1] * 2 + [2], E))
    kept_E = torch.bincount(routing.expert_idx_TK[routing.keep_TK], minlength=E)
    assert kept_E.tolist() == [3, 2, 1, 0]
    assert capacity(torch.tensor(8), 0.01, 1, E, 3).item() == 3


def test_shared_experts_add_a_swiglu_of_every_valid_token_to_the_routed_output():
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(4))
    valid = torch.arange(10) < 7
    routed = MoE(16, 24, 4, top_k=2, layer_id=2)
    both = MoE(16, 24, 4, top_k=2, layer_id=2, num_shared_experts=2)
    routed.init_weights(seed=5)
    both.init_weights(seed=5)
    assert both.shared_experts.w1_HD.shape == (48, 16)  # two experts of d_ff=24, fused
    s = both.shared_experts
    swiglu = (torch.nn.functional.silu(x @ s.w1_HD.t()) * (x @ s.w3_HD.t())) @ s.w2_DH.t()
    torch.testing.assert_close(both(x, valid).out, routed(x, valid).out + swiglu * valid[:, None])
    assert torch.all(both(x, valid).out[~valid] == 0)


def test_group_limited_routing_picks_experts_only_within_the_best_groups():
    E, G = 8, 4  # groups {0,1} {2,3} {4,5} {6,7}
    router = Router(E, E, 3, n_groups=G, topk_groups=2)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    # softmax scores are proportional to exp(logit); group scores (sum of the two best):
    # g0 = e^3 + 1 = 21.1, g1 = 2 e^2.9 = 36.3, g2 = e^3.2 + e^-5 = 24.5, g3 = 2: g1 and g2 win
    x = torch.tensor([[3.0, 0.0, 2.9, 2.9, 3.2, -5.0, 0.0, 0.0]])
    routing = route(router, x)
    # expert 0 is the second best overall, but its group lost: the three come from g1 and g2
    assert sorted(routing.expert_idx_TK[0].tolist()) == [2, 3, 4]
    probs = torch.softmax(x @ router.weight.t(), -1)
    chosen = probs.gather(1, routing.expert_idx_TK)
    torch.testing.assert_close(routing.weight_TK, chosen / chosen.sum(-1, keepdim=True))
    many = route(router, torch.randn(200, E, generator=torch.Generator().manual_seed(0)))
    groups_per_token = [len({e // 2 for e in row}) for row in many.expert_idx_TK.tolist()]
    assert max(groups_per_token) <= 2


def test_sequence_scope_averages_each_sequences_own_balance_loss():
    E, S = 4, 8
    router = router_with_identity_gate(E, scale=50.0, aux_loss_scope="sequence")
    balanced = [0, 1, 2, 3] * 2  # f = 1/4 each, P = 1/4 each: 1.0
    collapsed = [0] * S  # f = [1, 0, 0, 0], P = [1, 0, 0, 0]: E = 4
    x = one_hot_tokens(balanced + collapsed, E)
    routing = router(x, seq_len=S)
    counts = RoutingCounts.split(routing.local_counts)
    assert int(counts.sequences) == 2
    aux, _ = balance_losses(routing, counts, 1, 1, "sequence")
    assert aux.item() == pytest.approx((1.0 + 4.0) / 2, rel=1e-5)
    # micro_batch scope sees one pooled batch instead: f = [5/8, 1/8, 1/8, 1/8], P the same
    pooled, _ = balance_losses(routing, counts, 1, 1, "micro_batch")
    assert pooled.item() == pytest.approx(4 * (25 + 1 + 1 + 1) / 64, rel=1e-5)


def test_global_batch_scope_takes_f_from_the_previous_step():
    E = 4
    layer = MoE(E, 8, E, top_k=1, layer_id=0, aux_loss_scope="global_batch")
    layer.init_weights(seed=0)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E) * 50)
    x = one_hot_tokens([0, 0, 0, 1], E)
    first = layer(x)
    assert first.aux_loss.item() == pytest.approx(1.0, abs=1e-6)  # no previous step: uniform f
    layer.router.finish_step(applied=True)
    assert layer.router.prev_counts_E.tolist() == [3, 1, 0, 0]
    second = layer(one_hot_tokens([2, 3, 2, 3], E))
    # f = [3/4, 1/4, 0, 0] from the previous step, P = [0, 0, 1/2, 1/2] now: no overlap
    assert second.aux_loss.item() == pytest.approx(0.0, abs=1e-6)
    layer.router.pending_counts_E.zero_()
    layer.router.finish_step(applied=False)  # a skipped step keeps the previous counts
    assert layer.router.prev_counts_E.tolist() == [3, 1, 0, 0]


def test_router_noise_is_training_only_keyed_by_token_place_and_step():
    E, D = 8, 16
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(6))
    plain = Router(D, E, 2)
    noisy = Router(D, E, 2, router_jitter=0.2, noisy_topk=True)
    plain.init_weights(seed=1, layer_id=0, std=0.3)
    noisy.init_weights(seed=1, layer_id=0, std=0.3)
    noisy.eval()
    torch.testing.assert_close(noisy(x).weight_TK, plain(x).weight_TK)  # eval: no noise
    noisy.train()
    a = noisy(x)
    assert not torch.allclose(a.prob_sum_E, plain(x).prob_sum_E)
    torch.testing.assert_close(noisy(x).prob_sum_E, a.prob_sum_E)  # same step, same places: same noise
    # the noise of a token depends on its place in the step, not on how the batch is cut
    tail = noisy(x[5:], token_offset=5)
    torch.testing.assert_close(tail.prob_sum_E, noisy(x).prob_sum_E - noisy(x[:5]).prob_sum_E, rtol=1e-5, atol=1e-5)
    noisy.finish_step(applied=True)
    assert not torch.allclose(noisy(x).prob_sum_E, a.prob_sum_E)  # a new step draws new noise
    (noisy(x).prob_sum_E ** 2).sum().backward()
    assert noisy.noise_weight.grad is not None and noisy.noise_weight.grad.abs().sum() > 0  # W_noise learns


def test_sigmoid_top1_keeps_the_raw_score_so_the_gate_learns_from_the_output():
    layer = MoE(16, 24, 4, top_k=1, layer_id=0, score_func="sigmoid")
    layer.init_weights(seed=0)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    routing = layer.router(x)
    chosen = torch.sigmoid(x @ layer.router.weight.t()).gather(1, routing.expert_idx_TK)
    torch.testing.assert_close(routing.weight_TK, chosen)  # not renormalised to 1
    layer(x).out.sum().backward()
    assert layer.router.weight.grad.abs().sum() > 1e-2
