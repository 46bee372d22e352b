"""GPU placement on declared devices. This machine has no GPU: placement works on the
declared numbers, and each backend reports the CUDA_VISIBLE_DEVICES it was given."""

import re

from harness import REFERENCE, wait_until

GIB = 1024 ** 3


def gpu_backends():
    return {"reference": {"command": REFERENCE, "startup_timeout": 10, "stop_timeout": 2,
                          "resources": {"gpus": 1, "gpu_memory": "30GiB"}}}


def devices_reported(daemon, name):
    """The CUDA_VISIBLE_DEVICES the backend itself printed at start."""
    pattern = re.compile(rf"\[{re.escape(name)}\] .*CUDA_VISIBLE_DEVICES=([^)]*)\)")
    found = wait_until(lambda: pattern.findall(daemon.log()), 5,
                       message=f"{name}'s start line")
    return found[-1]


def test_devices_are_assigned_without_double_booking_memory(daemon_factory):
    daemon = daemon_factory({"a": [], "b": [], "c": [], "d": []}, backends=gpu_backends(),
                            gpus=[{"id": 0, "memory": "80GiB"}, {"id": 1, "memory": "40GiB"}])
    placed = {}
    for name in ("a", "b", "c"):
        reply = daemon.load(name)
        assert reply["success"], reply
        placed[name] = reply["data"]["model"]["gpus"]
        assert devices_reported(daemon, name) == ",".join(str(d) for d in placed[name])
    # Best fit: the 40 GiB device takes the first 30 GiB model, the 80 GiB one the next two.
    assert placed == {"a": [1], "b": [0], "c": [0]}
    gpus = {g["id"]: g for g in daemon.request("status")["data"]["gpus"]}
    assert gpus[0]["free"] == 20 * GIB and gpus[1]["free"] == 10 * GIB
    assert sorted(gpus[0]["models"]) == ["b", "c"]
    # A fourth 30 GiB model does not fit anywhere: the least recently used idle one goes.
    daemon.handshake("a")
    daemon.handshake("c")
    reply = daemon.load("d")
    assert reply["success"] and reply["data"]["model"]["gpus"] == [0]
    loaded = sorted(m["name"] for m in daemon.request("status")["data"]["models"])
    assert loaded == ["a", "c", "d"]                    # b was least recently used


def test_a_need_larger_than_any_device_is_refused_by_the_config(workdir):
    from harness import make_config
    from backend_mgmt import config
    document = make_config(workdir, models={"a": []}, backends=gpu_backends(),
                           gpus=[{"id": 0, "memory": "16GiB"}])
    assert config.validate(document) == [
        "supported_models[0].resources: needs 30 GiB on each of 1 GPU(s), 0 GPU(s) in gpus: "
        "have that much"]


def test_pinned_models_keep_their_gpu(daemon_factory, workdir):
    daemon = daemon_factory({"p": [], "q": []}, backends=gpu_backends(),
                            gpus=[{"id": 0, "memory": "40GiB"}])
    daemon.reconfigure(lambda document: document["supported_models"][0].update(pinned=True))
    assert daemon.load("p")["success"]
    import threading
    result = {}
    waiter = threading.Thread(target=lambda: result.update(daemon.load("q", timeout=5)))
    waiter.start()
    wait_until(lambda: daemon.request("status")["data"]["queued"] == ["q"], 5,
               message="q to wait for GPU room")
    assert daemon.model("p")["state"] == "ready"        # pinned: not evicted
    assert daemon.request("unload-model", {"model_name": "p"})["success"]
    waiter.join(10)
    assert result["success"] and result["data"]["model"]["gpus"] == [0]
