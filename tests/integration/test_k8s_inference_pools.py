"""The inference pools of the overlays: engine settings per device, and the gpu-spot overlay's second pool on
spot nodes beside the on-demand one."""

from __future__ import annotations

import yaml

from tests.integration.k8s_docs import Doc, env, generated, named, of_kind


def test_only_cpu_engines_run_native_rotary_embeddings() -> None:
    # vLLM 0.32's CPU rotary kernel is wrong on some CPUs (the default leaves it out); its CUDA kernel is not.
    from services.inference.config import InferenceSettings

    assert "-rotary_embedding" in InferenceSettings().custom_ops_list()
    for overlay, custom_ops in (("gpu", "all"), ("cpu-dev", None)):
        engines = [d for d in of_kind(overlay, "Deployment") if d["metadata"]["name"].startswith("inference")]
        assert engines, overlay
        for deployment in engines:
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            assert env(container).get("MESHSERVE_INFERENCE_CUSTOM_OPS") == custom_ops, overlay


def test_the_spot_pool_runs_on_spot_nodes_leaves_within_the_notice_and_scales_first() -> None:
    # gpu-spot is gpu plus components/spot: a second inference pool on spot nodes, on-demand as the floor.
    on_demand, spot = named("gpu-spot", "Deployment", "inference"), named("gpu-spot", "Deployment", "inference-spot")
    pools = {"on-demand": on_demand, "spot": spot}
    for capacity, pool in pools.items():
        assert pool["spec"]["selector"]["matchLabels"]["meshserve.dev/capacity"] == capacity
        assert pool["spec"]["template"]["metadata"]["labels"]["meshserve.dev/capacity"] == capacity
    # Both pools serve the same model on GPUs (the components that follow spot reach its pool too) and sit
    # behind the one headless Service the router resolves: no second one, and its selector takes both.
    served = {env(p["spec"]["template"]["spec"]["containers"][0])["MESHSERVE_INFERENCE_MODEL"] for p in pools.values()}
    assert served == {
        env(named("gpu", "Deployment", "inference")["spec"]["template"]["spec"]["containers"][0])[
            "MESHSERVE_INFERENCE_MODEL"
        ]
    }
    services = [s for s in of_kind("gpu-spot", "Service") if s["metadata"]["name"].startswith("inference")]
    assert [s["metadata"]["name"] for s in services] == ["inference-headless"]
    for pool in pools.values():
        assert services[0]["spec"]["selector"].items() <= pool["spec"]["template"]["metadata"]["labels"].items()
    spec = spot["spec"]["template"]["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    keys = {e["key"] for term in terms for e in term["matchExpressions"]}
    clouds = {"cloud.google.com/gke-spot", "eks.amazonaws.com/capacityType", "kubernetes.azure.com/scalesetpriority"}
    assert keys == clouds
    tolerated = {t["key"] for t in spec["tolerations"]}
    assert {"cloud.google.com/gke-spot", "kubernetes.azure.com/scalesetpriority", "nvidia.com/gpu"} <= tolerated
    assert "affinity" not in on_demand["spec"]["template"]["spec"]  # on-demand runs anywhere with a GPU
    # Out within the shortest notice (30 s), the drain started by the preStop hook, the server's own drain
    # and grace inside the pod's.
    grace = spec["terminationGracePeriodSeconds"]
    [container] = [c for c in spec["containers"] if c["name"] == "inference"]
    drain = float(env(container)["MESHSERVE_INFERENCE_DRAIN_SECONDS"])
    assert grace <= 30 and drain + float(env(container)["MESHSERVE_INFERENCE_GRACE_SECONDS"]) < grace
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sh", "-c", "kill -TERM 1"]
    # Spot scales first (a lower queue target), on-demand is the floor (its minimum kept).
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"] for h in of_kind("gpu-spot", "HorizontalPodAutoscaler")}

    def targets(hpa: Doc) -> list[float]:
        return [float(m.get("external", m.get("pods"))["target"]["averageValue"]) for m in hpa["metrics"]]

    assert hpas["inference"]["minReplicas"] >= 1
    # Each pool says which it is, and the router's catalogue fills spot first.
    assert {
        c: env(p["spec"]["template"]["spec"]["containers"][0])["MESHSERVE_INFERENCE_POOL"] for c, p in pools.items()
    } == {
        "on-demand": "on-demand",
        "spot": "spot",
    }
    catalogue = yaml.safe_load(
        named("gpu-spot", "ConfigMap", generated("gpu-spot", "router-catalogue"))["data"]["catalogue.yaml"]
    )
    [weights] = [m["pool_weights"] for m in catalogue["models"]]
    assert weights["spot"] > weights["on-demand"]
    assert all(s < o for s, o in zip(targets(hpas["inference-spot"]), targets(hpas["inference"]), strict=True))


def test_the_gpu_overlay_serves_a_quantized_checkpoint_with_an_fp8_kv_cache() -> None:
    # Every pool of both GPU overlays: the FP8 checkpoint (its scheme read from its own config by vLLM), an FP8
    # KV cache, and no override of the quantization method; the router's catalogue names the same model.
    from services.inference.config import InferenceSettings

    for overlay in ("gpu", "gpu-spot"):
        engines = [d for d in of_kind(overlay, "Deployment") if d["metadata"]["name"].startswith("inference")]
        for deployment in engines:
            settings = env(deployment["spec"]["template"]["spec"]["containers"][0])
            assert settings["MESHSERVE_INFERENCE_MODEL"] == "RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"
            assert settings["MESHSERVE_INFERENCE_KV_CACHE_DTYPE"] == "fp8"
            assert "MESHSERVE_INFERENCE_QUANTIZATION" not in settings
            # The names are the settings' own (a typo would leave the engine unquantized, silently).
            assert {"kv_cache_dtype", "quantization"} <= InferenceSettings.model_fields.keys()
        catalogue = yaml.safe_load(
            named(overlay, "ConfigMap", generated(overlay, "router-catalogue"))["data"]["catalogue.yaml"]
        )
        assert [m["id"] for m in catalogue["models"]] == ["RedHatAI/Meta-Llama-3.1-8B-Instruct-FP8"]
        # The routers take only replicas that report running what the engines are set to.
        assert [m["kv_cache_dtype"] for m in catalogue["models"]] == ["fp8"]
