"""GPU placement: which of the host's GPUs a backend gets, and whom to evict to make room.

Pure functions of the declared GPUs (``gpus:``), the current assignments and what a model
needs (``resources.gpus`` / ``resources.gpu_memory``). What the driver measures comes in
from outside (nvidia_smi.py, read by usage.py).

The rule that keeps GPU memory from being given twice:
- A need with ``memory`` (per device) shares a device with other memory needs while the
  device's declared memory minus what they hold covers it. It can only go on a device whose
  memory is declared: on any other we could not tell whether it fits.
- A need without ``memory`` takes whole devices: only devices nobody holds, and nobody else
  gets them while it does. A backend that states no memory may take all there is (vLLM takes
  90% by default), so sharing its device is how two backends run out of memory.
"""

from dataclasses import dataclass
from typing import NamedTuple

from .sizes import format_size, parse_size


@dataclass(frozen=True)
class Gpu:
    id: int | str            # as CUDA_VISIBLE_DEVICES takes it: an index or a UUID
    memory: int | None       # bytes; None: not declared, only whole-device needs fit


@dataclass(frozen=True)
class Need:
    count: int = 0           # devices; 0 with memory set means one
    memory: int = 0          # bytes on each device; 0: whole devices

    @property
    def devices(self):
        return self.count or (1 if self.memory else 0)


class Assignment(NamedTuple):
    devices: tuple           # device ids
    memory: int              # bytes held on each; 0: the devices are held whole


class Plan(NamedTuple):
    devices: tuple           # device ids for the new backend
    evict: list              # model names to unload first, least recently used first


def parse_gpus(config_list):
    """The ``gpus:`` list (items a bare id or ``{id, memory}``) as a tuple of Gpu, in config
    order. Raises ValueError for a malformed item or an id given twice."""
    gpus, seen = [], set()
    for item in config_list or ():
        if isinstance(item, dict):
            gpu_id, memory = item.get("id"), item.get("memory")
            memory = None if memory is None else parse_size(memory)
        else:
            gpu_id, memory = item, None
        if isinstance(gpu_id, bool) or not isinstance(gpu_id, (int, str)) or gpu_id == "":
            raise ValueError(f"gpus: {item!r} has no id (an index like 0 or a GPU UUID)")
        if str(gpu_id) in seen:      # 0 and "0" name the same device to CUDA
            raise ValueError(f"gpus: GPU {gpu_id} is listed twice")
        seen.add(str(gpu_id))
        gpus.append(Gpu(gpu_id, memory))
    return tuple(gpus)


def parse_need(resources):
    """What a model's ``resources:`` mapping asks of placement, as a Need: ``gpus`` as a
    number is that many devices to place, each with ``gpu_memory`` free (a memory alone: one
    device). ``gpus`` as a list or string names fixed devices, which are not placed. The one
    reading of these keys: config validation, the Config and the scheduler all use it."""
    resources = resources or {}
    count, memory = resources.get("gpus"), resources.get("gpu_memory")
    if isinstance(count, bool) or not isinstance(count, int):
        count = 0
    if count < 0:
        raise ValueError(f"resources.gpus: {count!r} is not a number of GPUs")
    return Need(count=count, memory=0 if memory is None else parse_size(memory))


def holders(assignments):
    """{device id: [model names holding it]}, names in assignment order."""
    held = {}
    for name, (devices, _memory) in assignments.items():
        for device in devices:
            held.setdefault(str(device), []).append(name)
    return held


def free_memory(gpus, assignments):
    """{device id: free bytes, or None where memory is not declared}. A device held whole
    has none free."""
    used = {str(gpu.id): 0 for gpu in gpus}
    whole = set()
    for devices, memory in assignments.values():
        for device in map(str, devices):
            if device in used:
                used[device] += memory
                if not memory:
                    whole.add(device)
    return {gpu.id: None if gpu.memory is None
            else 0 if str(gpu.id) in whole
            else max(0, gpu.memory - used[str(gpu.id)])
            for gpu in gpus}


def place(gpus, assignments, need):
    """``need.devices`` distinct device ids that can take ``need`` now, or None.

    Best fit: the devices left with the least free memory after placing, ties in config
    order, so that the roomiest devices stay free for the biggest models. Whole-device needs
    take undeclared devices first (memory needs cannot use those), then the smallest."""
    if need.devices == 0:
        return ()
    free = free_memory(gpus, assignments)
    held = holders(assignments)
    if need.memory:
        fitting = [(free[gpu.id] - need.memory, order, gpu.id)
                   for order, gpu in enumerate(gpus)
                   if free[gpu.id] is not None and free[gpu.id] >= need.memory]
    else:
        fitting = [(-1 if gpu.memory is None else gpu.memory, order, gpu.id)
                   for order, gpu in enumerate(gpus) if str(gpu.id) not in held]
    if len(fitting) < need.devices:
        return None
    return tuple(gpu_id for _, _, gpu_id in sorted(fitting)[:need.devices])


def place_on(gpus, assignments, need, devices):
    """``devices`` if ``need`` fits on exactly those devices now, else None: a parked backend
    wakes on the GPUs it had (a CUDA process cannot move to others)."""
    free = free_memory(gpus, assignments)
    held = holders(assignments)
    known = {str(gpu.id): gpu.id for gpu in gpus}
    for device in map(str, devices):
        if device not in known:
            return None
        room = free[known[device]]
        fits = (room is not None and room >= need.memory) if need.memory \
            else device not in held
        if not fits:
            return None
    return tuple(devices)


def never_fits(gpus, need):
    """Why ``need`` cannot be placed on this host even with every GPU free, or None."""
    if need.devices > len(gpus):
        return (f"needs {need.devices} GPU{'s' * (need.devices > 1)}, "
                f"the host has {len(gpus) or 'none'} (gpus:)")
    if need.memory:
        big_enough = [gpu for gpu in gpus
                      if gpu.memory is not None and gpu.memory >= need.memory]
        if len(big_enough) < need.devices:
            if all(gpu.memory is None for gpu in gpus):
                return (f"needs {format_size(need.memory)} of GPU memory but no GPU in gpus: "
                        f"declares its memory")
            return (f"needs {format_size(need.memory)} on each of {need.devices} GPU(s), "
                    f"{len(big_enough)} GPU(s) in gpus: have that much")
    return None


def plan_with_eviction(gpus, assignments, need, candidates, devices=None):
    """Where to place ``need`` and which models to unload first, or None.

    ``candidates``: the models that may be evicted, least recently used first (the caller
    leaves out pinned models and ones still loading). Evicts the shortest prefix of them that
    makes room, less any model in it whose eviction turns out not to help (tried from the
    most recently used down, since those are likeliest to be used again). None when even
    evicting them all does not make room; ``never_fits`` tells whether anything could.
    ``devices``: only exactly these devices will do (a wake: place_on)."""
    if never_fits(gpus, need) is not None:
        return None

    def fit(held):
        return place(gpus, held, need) if devices is None \
            else place_on(gpus, held, need, devices)

    found = fit(assignments)
    if found is not None:
        return Plan(found, [])
    # Models holding no GPU free none by leaving.
    candidates = [name for name in candidates if assignments.get(name, ((), 0))[0]]

    def without(names):
        return {name: held for name, held in assignments.items() if name not in names}

    for count in range(1, len(candidates) + 1):
        if fit(without(set(candidates[:count]))) is not None:
            break
    else:
        return None
    # Fitting only gets easier as more models leave, so the last of the prefix stays needed
    # and one pass leaves a set from which no model can be spared.
    evict = candidates[:count]
    for name in reversed(candidates[:count - 1]):
        fewer = [other for other in evict if other != name]
        if fit(without(set(fewer))) is not None:
            evict = fewer
    return Plan(fit(without(set(evict))), evict)


def cuda_visible_devices(device_ids):
    """The CUDA_VISIBLE_DEVICES value for ``device_ids``: "0,1". Empty hides every GPU."""
    return ",".join(str(device) for device in device_ids)


def cuda_environment(device_ids):
    """Environment for a backend given ``device_ids``. PCI_BUS_ID: CUDA otherwise numbers
    the fastest GPU 0, not the one nvidia-smi (and so the operator) calls 0."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": cuda_visible_devices(device_ids)}


def device_status(gpus, assignments, measured=None):
    """Per GPU for status: declared and free memory, its models, and where ``measured``
    (nvidia_smi.parse_devices's result) has the device's index, the driver's free and total
    memory."""
    free = free_memory(gpus, assignments)
    held = holders(assignments)
    measured = measured or {}
    status = []
    for gpu in gpus:
        entry = {"id": gpu.id, "memory": gpu.memory, "free": free[gpu.id],
                 "models": held.get(str(gpu.id), [])}
        index = _as_index(gpu.id)
        if index in measured:
            entry["measured_free"] = measured[index]["free"]
            entry["measured_total"] = measured[index]["total"]
        status.append(entry)
    return status


def _as_index(gpu_id):
    if isinstance(gpu_id, int) or (isinstance(gpu_id, str) and gpu_id.isdigit()):
        return int(gpu_id)
    return None                 # a UUID: nvidia-smi's index cannot be matched to it
