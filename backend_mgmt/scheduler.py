"""Which models are loaded: on-demand loads, idle unloads, the model budget, GPU placement.

Sits in front of ``BackendManager.load``: every load (load-model, an on-demand handshake,
preload) asks the scheduler, which starts it at once when there is room, evicts the least
recently used idle model to make room (never a pinned one, nor one still loading), or queues
it (``max_queue``) until a slot frees. A model that needs GPUs (``resources.gpus: N``,
``gpu_memory``) also needs room on the host's declared GPUs (placement.py): it gets devices
whose memory no other backend holds, evicting idle models by the same rules if needed. Each use (a handshake for the model, an explicit load)
restarts the model's idle clock; after ``keep_alive`` seconds without one it is unloaded.
"""

import collections
import logging
from dataclasses import dataclass

from . import errors, placement, states
from .errors import ServiceError
from .events import EVICTED

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Use:
    """What the scheduler remembers of a known model's use."""
    last_used: float = 0.0                  # loop clock: its last handshake, load, readiness
    keep_alive: float | None = None         # load-model --keep-alive, for this load
    idle_timer: object = None               # one per model, re-armed when it fires early


class Scheduler:
    def __init__(self, loop, manager, publish_event=None):
        self.loop = loop                        # its clock() and wall_clock(): the only time
        self.manager = manager
        self.publish_event = publish_event or (lambda backend, state, reason: None)
        self.queue = collections.deque()        # (name, done, keep_alive) waiting for room
        self.evicting = set()                   # names being unloaded to make room
        self.assignments = {}                   # name -> placement.Assignment (GPUs held)
        self.uses = {}                          # Backend -> Use, until it is unloaded
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
        unloading = backend is not None and backend.phase == states.UNLOADING
        devices = None if unloading else self._room_for(spec)
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
            log.info("model %s: load waits for its unload to finish", spec.name)
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

    def _room_for(self, spec):
        """Devices to start ``spec`` on now (() when it needs none), or None: no room yet."""
        if not self._has_room():
            return None
        need = self.need(spec)
        if not need.count and not need.memory:
            return ()
        return placement.place(self.config.gpus, self.assignments, need)

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
                [b.name for b in candidates if b.name not in self.evicting])
            for name in plan.evict if plan else ():
                self._evict(self.registry.get(name), "GPU room")

    def _evict(self, victim, why):
        waiting_for = self.queue[0][0] if self.queue else "?"
        reason = f"evicted to make room for {waiting_for} ({why}); least recently used"
        self.evicting.add(victim.name)
        self.publish_event(victim, EVICTED, reason)
        self.manager.unload_backend(victim, lambda b: None, reason)

    def _drain_queue(self):
        while self.queue:
            name, done, keep_alive = self.queue[0]
            current = self.registry.get(name)
            if current is not None and current.phase == states.UNLOADING:
                break                               # its unload is not finished yet
            spec = self.config.models.get(name)
            devices = self._room_for(spec) if spec is not None else ()
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
        self.use(backend).last_used = self.loop.clock()
        backend.shown_elsewhere_changed()         # its unload_at (and keep_alive) in status
        self._arm_idle_timer(backend)

    def unload_at(self, backend):
        """Wall-clock time the model will be unloaded for idleness, or None."""
        keep = self.keep_alive(backend)
        if keep < 0 or backend.spec.pinned or backend.state != states.READY:
            return None
        return self.loop.wall_clock() + (self.use(backend).last_used + keep - self.loop.clock())

    def _arm_idle_timer(self, backend):
        keep = self.keep_alive(backend)
        use = self.use(backend)
        if keep < 0 or backend.spec.pinned or use.idle_timer is not None or \
                not backend.answers_clients:
            # One timer per backend, re-armed when it fires early (no churn per use); none
            # before it is ready: the READY transition arms it.
            return
        use.idle_timer = self.loop.call_at(use.last_used + keep,
                                           lambda: self._idle_check(backend))

    def _idle_check(self, backend):
        use = self.use(backend)
        use.idle_timer = None
        if not backend.answers_clients or self.registry.get(backend.name) is not backend:
            return                                # the READY transition arms it again
        keep = self.keep_alive(backend)
        if keep < 0 or backend.spec.pinned:
            return
        idle_for = self.loop.clock() - use.last_used
        if idle_for + 0.001 < keep:
            self._arm_idle_timer(backend)         # used since: wait out the rest
            return
        self.manager.unload_backend(backend, lambda b: None,
                                    f"idle for {idle_for:.1f} s (keep_alive {keep:g} s)")

    # -- registry events -------------------------------------------------------------
    def _on_transition(self, backend, old_state, new_state):
        if new_state == states.LOADING and backend.gpu_devices and \
                backend.name not in self.assignments:
            # Adopted from a previous daemon: its devices are taken.
            self.assignments[backend.name] = placement.Assignment(
                backend.gpu_devices, self.need(backend.spec).memory)
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

    @staticmethod
    def _cancel_idle_timer(use):
        if use.idle_timer is not None:
            use.idle_timer.cancel()
            use.idle_timer = None
