"""Which models are loaded: on-demand loads, idle unloads, the model budget, GPU placement.

Sits in front of ``BackendManager.load``: every load (load-model, an on-demand handshake,
preload) asks the scheduler, which starts it at once when there is room, evicts the least
recently used idle model to make room (never a pinned one, nor one still loading), or queues
it (``max_queue``) until a slot frees. A model that needs GPUs (``resources.gpus: N``,
``gpu_memory``) also needs room on the host's declared GPUs (placement.py): it gets devices
whose memory no other backend holds, evicting idle models by the same rules if needed. Each use (a handshake for the model, an explicit load)
restarts the model's idle clock; after ``keep_alive`` seconds without one it is unloaded.

Parking (issue 13, README "Parking models"): a model whose backend can park (``park:``, the
manager has a Parker for it) and is not pinned is parked instead of unloaded when it is
evicted, if its weights fit the ``host_memory`` budget (the parked models used least often
lately are unloaded to make host room when that lets it fit), and after ``park_after`` idle
seconds.
A parked model holds no slot and no GPU memory (its assignment is released on PARKED, not
before); ``keep_alive``, counted from its last use, then unloads it. Waking it needs room
again, on exactly the devices it had: it waits in the queue like a load until they are free.
"""

import collections
import logging
from dataclasses import dataclass

from . import errors, placement, states
from .errors import ServiceError
from .events import EVICTED
from .sizes import format_size

log = logging.getLogger(__name__)


USE_HALF_LIFE = 3600.0      # seconds: how fast a model's use rate forgets old uses


@dataclass
class UseRate:
    """How often a model is used lately: each use adds 1 and the sum halves every
    USE_HALF_LIFE seconds. Which parked model to unload for host room goes by this, not by
    the last use: every parked model has gone unused for a while (that is why it was parked),
    and the trace benchmark (benchmarks/bench_parking.py) paid 3-11% fewer load seconds over
    four seeds when the often-used ones stayed. Of two models used as often, the one used
    longer ago has the lower rate: recency still decides between equals."""
    value: float = 0.0
    at: float = 0.0              # loop clock of the last use

    def add(self, now):
        self.value = self.value_at(now) + 1
        self.at = now

    def value_at(self, now):
        return self.value * 0.5 ** ((now - self.at) / USE_HALF_LIFE)


@dataclass(eq=False)
class Use:
    """What the scheduler remembers of a known model's use."""
    last_used: float = 0.0                  # loop clock: its last handshake, load, readiness
    keep_alive: float | None = None         # load-model --keep-alive, for this load
    idle_timer: object = None               # one per model, re-armed when it fires early
    no_idle_park: bool = False              # its idle park found no host room: wait for
                                            # keep_alive (until its next use)


class Scheduler:
    def __init__(self, loop, manager, publish_event=None):
        self.loop = loop                        # its clock() and wall_clock(): the only time
        self.manager = manager
        self.publish_event = publish_event or (lambda backend, state, reason: None)
        self.queue = collections.deque()        # (name, done, keep_alive) waiting for room
        self.evicting = set()                   # names being unloaded or parked to make room
        self.assignments = {}                   # name -> placement.Assignment (GPUs held)
        self.parked_host = {}                   # name -> host bytes its parked weights hold,
                                                # from the park until it woke or is gone
        self.uses = {}                          # Backend -> Use, until it is unloaded
        self.rates = {}                         # model name -> UseRate, across unloads
        manager.registry.listeners.append(self._on_transition)

    @property
    def config(self):
        return self.manager.config

    @property
    def registry(self):
        return self.manager.registry

    # -- loading -----------------------------------------------------------------------
    def load(self, name, done, keep_alive=None):
        """Like BackendManager.load, within the budget. ``keep_alive`` overrides the model's
        for this load. Raises ServiceError (unknown model, queue_full)."""
        spec = self.manager.resolve(name)
        backend = self.registry.get(spec.name)
        if backend is not None and backend.phase in states.LOADED_OR_COMING:
            self._joined(backend, keep_alive)
            self.manager.load(spec.name, done)          # ready: at once; loading: joins
            return
        reason = placement.never_fits(self.config.gpus, self.need(spec))
        if reason:
            raise ServiceError(errors.GPU_UNAVAILABLE, f"model {spec.name} {reason}")
        unloading = backend is not None and backend.phase in (states.UNLOADING, states.PARKING)
        devices = None if unloading else self._room_for(spec, backend)
        if devices is not None:
            self._start(spec.name, done, keep_alive, devices)
            return
        if len(self.queue) >= self.config.max_queue:
            raise ServiceError(errors.QUEUE_FULL,
                               f"{self._count()} models loaded (max_loaded_models "
                               f"{self.config.max_loaded_models}), none can be evicted, and "
                               f"{len(self.queue)} loads are already waiting (max_queue)")
        self.queue.append((spec.name, done, keep_alive))
        if unloading:
            log.info("model %s: load waits for its %s to finish", spec.name,
                     "park" if backend.phase == states.PARKING else "unload")
            return
        log.info("model %s: waiting for room (%d loaded, max_loaded_models %s)", spec.name,
                 self._count(), self.config.max_loaded_models)
        self._make_room()

    def _start(self, name, done, keep_alive, devices=()):
        if devices:
            self.assignments[name] = placement.Assignment(
                devices, self.need(self.config.models[name]).memory)
        self.manager.load(name, done, devices=devices or None)
        backend = self.registry.get(name)
        if backend is not None:
            self.use(backend).keep_alive = keep_alive
            self.touch(backend)

    def _joined(self, backend, keep_alive):
        if keep_alive is not None:
            self.use(backend).keep_alive = keep_alive
        self.touch(backend)

    def queued_names(self):
        """The models whose loads wait for room, in queue order."""
        return [name for name, _, _ in self.queue]

    def rate(self, name):
        """The UseRate of model ``name``, made on first sight."""
        rate = self.rates.get(name)
        if rate is None:
            rate = self.rates[name] = UseRate()
        return rate

    def use(self, backend):
        """Its Use, made on first sight."""
        use = self.uses.get(backend)
        if use is None:
            use = self.uses[backend] = Use()
        return use

    def _count(self):
        return sum(1 for b in self.registry.backends.values() if b.phase in states.HOLDS_SLOT)

    def _has_room(self):
        limit = self.config.max_loaded_models
        return limit is None or self._count() < limit

    @staticmethod
    def need(spec):
        return spec.resources.need

    def _room_for(self, spec, backend=None):
        """Devices to start ``spec`` on now (() when it needs none), or None: no room yet.
        A parked ``backend`` wakes on exactly the devices it had (a CUDA process cannot
        move)."""
        if not self._has_room():
            return None
        need = self.need(spec)
        if not need.count and not need.memory:
            return ()
        woken_on = self._wakes_on(backend)
        if woken_on is not None:
            return placement.place_on(self.config.gpus, self.assignments, need, woken_on)
        return placement.place(self.config.gpus, self.assignments, need)

    @staticmethod
    def _wakes_on(backend):
        """The devices a parked backend must wake on, or None (not parked, or placed none)."""
        if backend is None or backend.phase != states.PARKED or not backend.gpu_devices:
            return None
        return backend.gpu_devices

    def _make_room(self):
        """Evict least recently used idle models for the queued loads, as far as needed:
        slots under max_loaded_models, and GPU room for the load at the head of the queue."""
        if not self.queue:
            return
        candidates = sorted((b for b in self.registry.backends.values()
                             if b.answers_clients and not b.spec.pinned
                             and b.name not in self.evicting),
                            key=lambda b: self.use(b).last_used)
        limit = self.config.max_loaded_models
        if limit is not None:
            needed = len(self.queue) - (limit - self._count()) - len(self.evicting)
            for victim in candidates[:max(0, needed)]:
                self._evict(victim, f"max_loaded_models {limit}")
        head = self.config.models.get(self.queue[0][0])
        if head is None:
            return
        need = self.need(head)
        if need.count or need.memory:
            going = {n: a for n, a in self.assignments.items() if n not in self.evicting}
            plan = placement.plan_with_eviction(
                self.config.gpus, going, need,
                [b.name for b in candidates if b.name not in self.evicting],
                devices=self._wakes_on(self.registry.get(head.name)))
            for name in plan.evict if plan else ():
                self._evict(self.registry.get(name), "GPU room")

    def _evict(self, victim, why):
        waiting_for = self.queue[0][0] if self.queue else "?"
        reason = f"evicted to make room for {waiting_for} ({why}); least recently used"
        self.evicting.add(victim.name)
        self.publish_event(victim, EVICTED, reason)
        self._park_or_unload(victim, reason)

    # -- parking -------------------------------------------------------------------------
    def _park_or_unload(self, victim, reason):
        """Park ``victim`` if it may (not pinned, a Parker) and its weights fit host_memory,
        unloading the parked models used least often for host room if that lets them fit;
        else unload it. True if it is being parked."""
        plan = self._host_room_plan(victim) if self._may_park(victim) else None
        if plan is None:
            self.manager.unload_backend(victim, lambda b: None, reason)
            return False
        self._park(victim, plan, reason, lambda error: None)
        return True

    def _may_park(self, backend):
        return not backend.spec.pinned and self.manager.can_park(backend)

    def _host_room_plan(self, backend):
        """The parked backends to unload (least used lately first: UseRate) so that
        ``backend``'s weights fit host_memory: [] when they fit now or there is no budget; None
        when even unloading every parked model would not do. Never one queued to wake: the
        room is being made for it, and unloading it would turn its wake into a cold load."""
        budget = self.config.host_memory
        if budget is None:
            return []
        need = backend.spec.host_memory
        free = budget - self._host_held()
        plan = []
        waiting = set(self.queued_names())
        now = self.loop.clock()
        parked = sorted((b for b in self.registry.backends.values()
                         if b.phase == states.PARKED and b.name not in waiting),
                        key=lambda b: self.rate(b.name).value_at(now))
        for other in parked:
            if free >= need:
                break
            plan.append(other)
            free += self.parked_host.get(other.name, 0)
        return plan if free >= need else None

    def _host_held(self):
        """Host bytes parked weights hold now, those of models queued to wake included: their
        weights stay in host memory until their wake has copied them back, so a park that
        makes GPU room for one holds its own weights at the same time."""
        return sum(self.parked_host.values())

    def _park(self, backend, host_plan, reason, done):
        for other in host_plan:
            # Their memory is counted until they exit (within their stop_timeout).
            self.manager.unload_backend(
                other, lambda b: None, f"host_memory {format_size(self.config.host_memory)} "
                f"full: unloaded to park {backend.name} (the parked model used least lately)")
        self.parked_host[backend.name] = backend.spec.host_memory
        self.manager.park_backend(backend, done, reason)

    def park(self, name, done):
        """park-model: park ``name`` now, pinned or not; ``done(None)`` once it is parked,
        ``done("why not")`` if the park failed (it is then unloaded). Raises ServiceError
        when it is not loaded, cannot park, or its weights cannot fit host_memory."""
        spec = self.manager.resolve(name)
        backend = self.registry.get(spec.name)
        if backend is None:
            raise ServiceError(errors.NOT_LOADED, f"model {spec.name} is not loaded")
        if backend.phase in (states.PARKING, states.PARKED):
            self.manager.park_backend(backend, done, "park-model")
            return
        if not self.manager.can_park(backend):
            why = "it is not ready" if backend.phase != states.READY else "it has no park:"
            raise ServiceError(errors.BAD_REQUEST, f"model {spec.name} cannot be parked: {why}")
        plan = self._host_room_plan(backend)
        if plan is None:
            raise ServiceError(errors.BAD_REQUEST, (
                f"model {spec.name} needs {format_size(spec.host_memory)} of host memory to "
                f"park, more than host_memory {format_size(self.config.host_memory)} can free"))
        self._park(backend, plan, "park-model", done)

    def _drain_queue(self):
        while self.queue:
            name, done, keep_alive = self.queue[0]
            current = self.registry.get(name)
            if current is not None and current.phase in (states.UNLOADING, states.PARKING):
                break                               # its unload or park is not finished yet
            spec = self.config.models.get(name)
            devices = self._room_for(spec, current) if spec is not None else ()
            if devices is None:
                break
            self.queue.popleft()
            try:
                self._start(name, done, keep_alive, devices)
            except ServiceError as error:       # e.g. removed from the config meanwhile
                done(None, error)
        if self.queue:
            self._make_room()

    def cancel_queued(self, error):
        """Answer every queued load with ``error`` (shutdown)."""
        queued, self.queue = list(self.queue), collections.deque()
        for _, done, _ in queued:
            done(None, error)

    # -- idle unloads ----------------------------------------------------------------
    def keep_alive(self, backend):
        override = self.use(backend).keep_alive
        return backend.spec.keep_alive if override is None else override

    def touch(self, backend):
        """A use of the model: its idle clock starts again."""
        use = self.use(backend)
        use.last_used = self.loop.clock()
        self.rate(backend.name).add(use.last_used)
        use.no_idle_park = False
        backend.shown_elsewhere_changed()         # its unload_at (and keep_alive) in status
        self._arm_idle_timer(backend)

    def unload_at(self, backend):
        """Wall-clock time the model will be unloaded for idleness, or None."""
        keep = self.keep_alive(backend)
        if keep < 0 or backend.spec.pinned or backend.state not in (states.READY,
                                                                    states.PARKED):
            return None
        return self.loop.wall_clock() + (self.use(backend).last_used + keep - self.loop.clock())

    def _park_after(self, backend):
        """Seconds idle before a ready ``backend`` is parked, or None: not for idleness."""
        after = backend.spec.park_after
        if after is None or self.use(backend).no_idle_park or not self._may_park(backend):
            return None
        return after

    def _idle_deadline(self, backend):
        """Loop-clock time of its next idle step (park, or unload), or None: none due.
        Both steps count from the last use: parked at park_after, unloaded at keep_alive."""
        if backend.spec.pinned:
            return None
        keep = self.keep_alive(backend)
        last_used = self.use(backend).last_used
        if backend.phase == states.PARKED:
            return None if keep < 0 else last_used + keep
        if not backend.answers_clients:
            return None                           # the READY transition arms it
        steps = [seconds for seconds in (self._park_after(backend), keep)
                 if seconds is not None and seconds >= 0]
        return last_used + min(steps) if steps else None

    def _arm_idle_timer(self, backend):
        # One timer per backend, re-armed when it fires early (no churn per use).
        use = self.use(backend)
        if use.idle_timer is not None:
            return
        deadline = self._idle_deadline(backend)
        if deadline is not None:
            use.idle_timer = self.loop.call_at(deadline, lambda: self._idle_check(backend))

    def _idle_check(self, backend):
        use = self.use(backend)
        use.idle_timer = None
        if self.registry.get(backend.name) is not backend:
            return
        deadline = self._idle_deadline(backend)
        if deadline is None:
            return
        if self.loop.clock() + 0.001 < deadline:
            self._arm_idle_timer(backend)         # used since: wait out the rest
            return
        idle_for = self.loop.clock() - use.last_used
        keep = self.keep_alive(backend)
        if backend.phase == states.READY and (keep < 0 or idle_for + 0.001 < keep):
            self._idle_park(backend, idle_for)
            return
        parked = " (parked)" if backend.phase == states.PARKED else ""
        self.manager.unload_backend(backend, lambda b: None,
                                    f"idle for {idle_for:.1f} s (keep_alive {keep:g} s)"
                                    f"{parked}")

    def _idle_park(self, backend, idle_for):
        reason = f"idle for {idle_for:.1f} s (park_after {backend.spec.park_after:g} s)"
        plan = self._host_room_plan(backend)
        if plan is None:
            log.info("model %s: %s, but its %s do not fit host_memory: it stays ready",
                     backend.name, reason, format_size(backend.spec.host_memory))
            self.use(backend).no_idle_park = True
            self._arm_idle_timer(backend)         # for keep_alive
            return
        self._park(backend, plan, reason, lambda error: None)

    # -- registry events -------------------------------------------------------------
    def _on_transition(self, backend, old_state, new_state):
        if new_state == states.LOADING and backend.gpu_devices and \
                backend.name not in self.assignments:
            # Adopted from a previous daemon: its devices are taken.
            self.assignments[backend.name] = placement.Assignment(
                backend.gpu_devices, self.need(backend.spec).memory)
        if backend.phase not in states.HOLDS_HOST_MEMORY:
            self.parked_host.pop(backend.name, None)   # woke, or its process is gone
        if new_state == states.PARKED:
            self._on_parked(backend, adopted=old_state == states.LOADING)
        if new_state == states.READY:
            use = self.use(backend)
            use.last_used = self.loop.clock()         # the idle clock runs from readiness
            self._cancel_idle_timer(use)
            self._arm_idle_timer(backend)
            if self.queue:
                self.loop.call_later(0, self._make_room)   # it may be evicted now
        elif new_state in (states.UNLOADED, states.FAILED):
            self.assignments.pop(backend.name, None)     # its GPU memory is free again
            use = self.uses.pop(backend, None) if new_state == states.UNLOADED \
                else self.uses.get(backend)
            if use is not None:
                self._cancel_idle_timer(use)
            self.evicting.discard(backend.name)
            if self.queue:
                # After the transition is done: a load started from inside a listener
                # would run before the other listeners saw this change.
                self.loop.call_later(0, self._drain_queue)

    def _on_parked(self, backend, adopted):
        """Its GPU memory is free now (not before: it is never given out twice); its slot too.
        A model adopted parked takes its host memory, and its idle clock starts now; the idle
        timer moves on to keep_alive."""
        self.assignments.pop(backend.name, None)
        self.evicting.discard(backend.name)
        self.parked_host.setdefault(backend.name, backend.spec.host_memory)
        use = self.use(backend)
        if adopted:
            use.last_used = self.loop.clock()
        self._cancel_idle_timer(use)
        self._arm_idle_timer(backend)
        if self.queue:
            self.loop.call_later(0, self._drain_queue)

    @staticmethod
    def _cancel_idle_timer(use):
        if use.idle_timer is not None:
            use.idle_timer.cancel()
            use.idle_timer = None
