"""Domain errors that carry a machine code; turned into wire replies in one place."""


class ServiceError(Exception):
    """A request the service refuses or cannot complete.

    ``code`` is the stable machine code put in the reply's ``code`` field; ``data`` is optional
    extra detail that goes into the reply's ``data`` field.
    """

    def __init__(self, code, message, data=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class InvalidTransition(RuntimeError):
    """A backend was asked to move between two states the table in states.py forbids."""


# Machine codes used in error replies (documented in README.md, "Control protocol").
BAD_JSON = "bad_json"
BAD_REQUEST = "bad_request"
BAD_FRAMES = "bad_frames"
TOO_LARGE = "too_large"
UNKNOWN_COMMAND = "unknown_command"
MISSING_PARAM = "missing_param"
BAD_PARAM = "bad_param"
UNKNOWN_MODEL = "unknown_model"
NOT_LOADED = "not_loaded"
LOAD_FAILED = "load_failed"
STARTUP_TIMEOUT = "startup_timeout"
FLAPPING = "flapping"
CONFIG_INVALID = "config_invalid"
QUEUE_FULL = "queue_full"
GPU_UNAVAILABLE = "gpu_unavailable"
HANDSHAKE_TIMEOUT = "handshake_timeout"
CANCELLED = "cancelled"
PARK_FAILED = "park_failed"
SHUTTING_DOWN = "shutting_down"
INTERNAL = "internal"
