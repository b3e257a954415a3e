"""MoR/CRW's ``router.selection`` node: the plain routers' selection rules on the combined scores F', built
from conf/router/selection/, and run configs written with the former flat keys (``select``, ``top_k``, ...)
read into the same routers."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_tiny
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mole.cli.common import hydra_error_line
from mole.config_schema import upgrade_config
from mole.routers import DynamicRouter, MoRRouter, TopPRouter, keep_top_k
from mole.routers.select import Dynamic, Soft, TopK, TopP, dynamic_select, keep_top_p
from mole.run_dir import load_run_config

E, D = 6, 16


def _router(node: dict, equal_weights: bool = False) -> MoRRouter:
    """A MoR router built from a router config node as Hydra builds it, with fixed weights."""
    torch.manual_seed(0)
    router = instantiate(OmegaConf.create(node))(in_features=D, num_experts=E)
    assert router.equal_weights is equal_weights
    return router


def _scores(router: MoRRouter, x: torch.Tensor) -> torch.Tensor:
    """F' (MoR eq. 6, or CRW eq. 7) computed here from the router's weights, independently of its forward."""
    sub = torch.softmax((x @ router.sub_routers.weight.T).view(len(x), router.n_routers, E), -1)
    if router.main_router is None:
        return sub.mean(1)
    main = torch.softmax(x @ router.main_router.weight.T, -1)
    return (main.unsqueeze(-1) * sub).sum(1)


# the flat MoR keys a run config held before `router.selection`, and what each selected on F'
OLD_MOR = {"_target_": "mole.routers.MoRRouter", "_partial_": True, "n_routers": 3, "main_top_k": None,
           "expert_balance": False, "dropout": 0.0, "select": "topk", "top_k": 2, "renorm": "sum", "top_p": 0.75,
           "keep_top_k": None, "q": 1.1, "threshold": 0.9, "normalized_entropy": True,
           "placement": "layer", "level": "token"}
OLD_CASES = [
    ({}, lambda s: keep_top_k(s, 2, "sum")[0]),
    ({"top_k": 3, "renorm": "softmax"}, lambda s: keep_top_k(s, 3, "softmax")[0]),
    ({"top_k": None}, lambda s: s),
    ({"select": "soft"}, lambda s: s),
    ({"select": "topp", "top_p": 0.5}, lambda s: keep_top_p(s, 0.5, min_k=1)[0]),
    ({"select": "dynamic", "threshold": 0.95}, lambda s: dynamic_select(s, 1.1, 0.95, 0.75, 2, True)[0]),
    ({"select": "dynamic", "q": 2.0, "keep_top_k": 1, "normalized_entropy": False},
     lambda s: dynamic_select(s, 2.0, 0.9, 0.75, 1, False)[0]),
]


@pytest.mark.parametrize("target", ["mole.routers.MoRRouter", "mole.routers.CRWRouter"])
@pytest.mark.parametrize("old, select", OLD_CASES)
def test_a_run_config_with_the_flat_keys_builds_the_same_selection(target, old, select):
    cfg = OmegaConf.create({"router": {**OLD_MOR, "_target_": target, **old}, "experts": {"num_experts": E}})
    upgrade_config(cfg)
    assert not {"select", "top_k", "top_p", "q", "placement", "level"} & set(cfg.router)
    assert (cfg.experts.placement, cfg.experts.level) == ("layer", "token")
    router = _router(OmegaConf.to_container(cfg.router), equal_weights=target.endswith("CRWRouter"))
    x = torch.randn(64, D) * 4  # spread enough that every selection drops some experts
    out = router(x)
    torch.testing.assert_close(out.probs, _scores(router, x))
    torch.testing.assert_close(out.gates, select(out.probs))


@pytest.mark.parametrize("name, cls", [("topk", TopK), ("soft", Soft), ("topp", TopP), ("dynamic", Dynamic)])
def test_each_shipped_selection_is_the_plain_routers_rule_on_the_combined_scores(name, cls):
    cfg = compose_tiny(["router=mor", f"router/selection={name}"])
    router = _router(OmegaConf.to_container(cfg.router))
    assert type(router.selection) is cls
    x = torch.randn(64, D) * 4
    out = router(x)
    gates, selected = router.selection(_scores(router, x))
    torch.testing.assert_close(out.gates, gates)
    assert (out.selected is None) == (selected is None) == (name == "soft")


@pytest.mark.parametrize("router, name", [("topp", "topp"), ("dynamic", "dynamic")])
def test_a_plain_router_and_mor_share_the_selection_defaults(router, name):
    plain = compose_tiny([f"router={router}"]).router
    mor = compose_tiny(["router=mor", f"router/selection={name}"]).router
    keys = set(mor.selection) - {"_target_", "_partial_"}
    assert keys and {k: plain[k] for k in keys} == {k: mor.selection[k] for k in keys}
    built = instantiate(plain)(in_features=D, num_experts=E)
    assert isinstance(built, {"topp": TopPRouter, "dynamic": DynamicRouter}[router])
    assert vars(built.selection) == vars(_router(OmegaConf.to_container(mor)).selection)


def test_crw_is_mor_with_equal_weights():
    mor, crw = compose_tiny(["router=mor"]).router, compose_tiny(["router=crw"]).router
    assert OmegaConf.to_container(crw) == {**OmegaConf.to_container(mor), "equal_weights": True}
    assert _router(OmegaConf.to_container(crw), equal_weights=True).main_router is None


@pytest.mark.parametrize(
    "override, expected",
    [
        ("router.placement=layer", "router.placement moved to experts.placement (read by the injector, not the router): "
                                   "use experts.placement=layer"),
        ("router.level=instance", "router.level moved to experts.level (read by the injector, not the router): "
                                  "use experts.level=instance"),
        ("router.select=dynamic", "router.select is now the config group router/selection (topk, soft, topp or "
                                  "dynamic): use router/selection=dynamic"),
        ("router.keep_top_k=3", "use router.selection.keep_top_k=3"),
    ],
)
def test_an_override_of_a_moved_key_names_the_new_one(override, expected):
    with pytest.raises(Exception) as err:  # noqa: PT011 - Hydra's composition error, turned into the line
        compose_tiny([override])
    assert expected in hydra_error_line(err.value)


def test_an_unknown_key_keeps_hydras_line():
    with pytest.raises(Exception) as err:  # noqa: PT011
        compose_tiny(["router.nope=1"])
    assert hydra_error_line(err.value).startswith("Could not override 'router.nope'")


def test_a_run_directory_written_with_the_former_keys_loads_in_the_current_layout(tmp_path):
    cfg = compose_tiny(["router=crw", "router/selection=topp", "router.selection.top_p=0.6", "experts.placement=layer"])
    old = OmegaConf.to_container(cfg)
    selection = old["router"].pop("selection")
    old["router"].update(_target_="mole.routers.CRWRouter", select="topp", top_p=0.6, keep_top_k=None, top_k=2,
                         renorm="sum", q=1.1, threshold=0.9, normalized_entropy=True,
                         placement=old["experts"].pop("placement"), level=old["experts"].pop("level"))
    for key in ("equal_weights", "main_top_k", "expert_balance"):
        old["router"].pop(key)
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    loaded = load_run_config(tmp_path)
    assert (loaded.experts.placement, loaded.experts.level) == ("layer", "token")
    assert OmegaConf.to_container(loaded.router.selection) == {k: v for k, v in selection.items()
                                                               if k not in ("top_p_keep_crossing", "renormalize")}
    router = _router(OmegaConf.to_container(loaded.router), equal_weights=True)
    assert vars(router.selection) == vars(_router(OmegaConf.to_container(cfg.router), equal_weights=True).selection)
