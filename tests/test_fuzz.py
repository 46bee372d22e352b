"""Fuzz and property tests: malformed input on either socket, and random configs.

Goal: every malformed frame gets an error reply where a reply is possible, and none can crash,
stall or grow the daemon.

- Pure properties (hypothesis): wire.split_envelope / parse_control / parse_handshake raise
  nothing but ServiceError with a documented code; config.validate never raises and names a
  field path on every line; config.from_document returns a Config or raises ConfigError.
- Against the real daemon (one daemon per test, seeded random.Random; set
  BACKEND_MGMT_FUZZ_SEED=<n> to replay a run): thousands of random frame lists on the control
  and the handshake socket from DEALER and REQ sockets, each reply checked against an oracle
  written from README.md; afterwards the daemon answers status within 1 s, is alive, and its
  RSS has not grown by more than RSS_GROWTH_LIMIT.
- Fairness: a client flooding status requests without reading replies does not starve another.

Run with ``-s`` to see the seed and the figures (RSS growth, latencies).
"""

import copy
import json
import os
import random
import string
import threading
import time
import uuid
from collections import Counter

import psutil
import pytest
import yaml
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from proptest import examples

from backend_mgmt import config, errors, wire
from backend_mgmt.errors import ServiceError
from backend_mgmt.messages import Request, Response

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_CONFIG = os.path.join(REPO, "tests", "fixtures", "original-config.json")
SHIPPED_CONFIG = os.path.join(REPO, "etc", "backend-mgmt", "config.yaml")

KNOWN_CODES = frozenset(value for name, value in vars(errors).items()
                        if name.isupper() and isinstance(value, str))
# The commands README.md documents; stop-service is never sent by the floods.
DOCUMENTED_COMMANDS = ("status", "load-model", "unload-model", "list-models", "stop-service")
MAX = wire.MAX_REQUEST_BYTES
RSS_GROWTH_LIMIT = 20 * 1024 * 1024
REPLY_TIMEOUT_MS = 5000          # every wait on a socket is bounded by this

PURE = settings(max_examples=examples(1500), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONFIGS = settings(max_examples=examples(600), deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])


def fuzz_seed():
    seed = int(os.environ.get("BACKEND_MGMT_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nfuzz seed: {seed} (replay with BACKEND_MGMT_FUZZ_SEED={seed})")
    return seed


# =====================================================================================
# 1. Pure properties
# =====================================================================================

def json_values(max_leaves=12, keys=st.text(max_size=12)):
    scalars = (st.none() | st.booleans() | st.integers() | st.floats()
               | st.text(max_size=30))
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=5)
        | st.dictionaries(keys, children, max_size=5),
        max_leaves=max_leaves)


request_like = st.fixed_dictionaries(
    {},
    optional={
        "command": st.sampled_from(DOCUMENTED_COMMANDS) | st.text(max_size=15) | json_values(4),
        "params": st.none() | json_values(4)
        | st.fixed_dictionaries({}, optional={"model_name": json_values(3) | st.text()}),
        "correlation_id": json_values(4) | st.uuids().map(str),
    })


def frames_strategy(max_frames=6):
    return st.lists(st.just(b"") | st.binary(max_size=40), max_size=max_frames)


@PURE
@given(frames_strategy())
def test_split_envelope_only_raises_bad_frames(frames):
    try:
        envelope, payload = wire.split_envelope(frames)
    except ServiceError as error:
        assert error.code == errors.BAD_FRAMES
        envelope = error.envelope
        if not frames:
            assert envelope is None
        else:
            # A reply is possible: the envelope is a prefix of what came in, starting with
            # the identity, and never swallows a payload frame that is not the delimiter.
            assert envelope is not None
            assert list(envelope.frames) == frames[:len(envelope.frames)]
            assert len(envelope.frames) == 1 or envelope.frames[-1] == b""
        return
    # Accepted only when there is exactly one payload frame (DEALER or REQ envelope).
    assert list(envelope.frames) + [payload] == frames
    assert len(frames) == 2 or (len(frames) == 3 and frames[1] == b"")


def control_oracle(payload):
    """What README.md allows the daemon to answer to one well-enveloped control payload.

    (answer, correlation_id). The answer is True (success), "LOADS" or "STOPS" (requests
    that would really load a model or stop the service) when the request is good, else the
    frozenset of error codes the README allows: every documented problem the payload has.
    The README gives no order among several problems, so any of them is a right answer; only
    the size is decided on the bytes alone ("too_large (over 64 KiB)", whatever they hold).
    """
    if len(payload) > MAX:
        return frozenset({errors.TOO_LARGE}), None
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):   # too deep is bad JSON too
        return frozenset({errors.BAD_JSON}), None
    if not isinstance(message, dict):
        return frozenset({errors.BAD_REQUEST}), None
    correlation_id = message.get("correlation_id")
    if not echoable(correlation_id):
        return frozenset({errors.BAD_REQUEST}), None
    problems = set()
    command = message.get("command")
    if command is None:
        problems.add(errors.MISSING_PARAM)
    elif not isinstance(command, str):
        problems.add(errors.BAD_REQUEST)
    elif command not in DOCUMENTED_COMMANDS:
        problems.add(errors.UNKNOWN_COMMAND)
    params = message.get("params", {})
    if params is not None and not isinstance(params, dict):
        problems.add(errors.BAD_REQUEST)
    params = params if isinstance(params, dict) else {}
    if command in ("load-model", "unload-model"):
        name = params.get("model_name")
        if name is None:
            problems.add(errors.MISSING_PARAM)
        elif not isinstance(name, str) or not name or len(name) > 1024:
            problems.add(errors.BAD_PARAM)
        elif name != "demo":       # the one model the daemon tests configure
            problems.add(errors.UNKNOWN_MODEL)
    if problems:
        return frozenset(problems), correlation_id
    if command in ("status", "list-models"):
        return True, correlation_id
    if command == "stop-service":
        return "STOPS", correlation_id
    if command == "load-model":
        return "LOADS", correlation_id
    return frozenset({errors.NOT_LOADED}), correlation_id   # unload-model of demo, not loaded


# Problems of the request as a whole, which parse_control itself must refuse; the rest
# (unknown command, the model_name param) may be left to the command handlers.
REQUEST_PROBLEMS = frozenset({errors.TOO_LARGE, errors.BAD_JSON, errors.BAD_REQUEST})


def echoable(correlation_id):
    """README: a correlation_id is echoed when it is null, a string of at most 256
    characters, or a finite number (integers below 2^63 in size)."""
    if correlation_id is None:
        return True
    if isinstance(correlation_id, str):
        return len(correlation_id) <= 256
    if isinstance(correlation_id, bool) or not isinstance(correlation_id, (int, float)):
        return False
    if isinstance(correlation_id, int):
        return abs(correlation_id) < 2 ** 63
    return correlation_id == correlation_id and abs(correlation_id) != float("inf")


def check_parse_control(payload):
    allowed, correlation_id = control_oracle(payload)
    try:
        request = wire.parse_control(payload)
    except ServiceError as error:
        assert error.code in KNOWN_CODES
        assert isinstance(allowed, frozenset) and error.code in allowed, (
            error.code, allowed, payload[:200])
        return
    # Parsed: the rest is the command handler's business.
    if isinstance(allowed, frozenset):
        assert not allowed & REQUEST_PROBLEMS, (allowed, payload[:200])
    assert isinstance(request.command, str) and isinstance(request.params, dict)
    assert same_json(request.correlation_id, correlation_id)


def same_json(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def mangle(data, payload):
    """A well-formed payload, then broken in one of a few ways."""
    how = data.draw(st.sampled_from(["none", "truncate", "flip", "insert", "pad"]))
    if how == "none" or not payload:
        return payload
    at = data.draw(st.integers(0, len(payload) - 1))
    if how == "truncate":
        return payload[:at]
    if how == "flip":
        flipped = payload[at] ^ data.draw(st.integers(1, 255))
        return payload[:at] + bytes([flipped]) + payload[at + 1:]
    if how == "insert":
        return payload[:at] + data.draw(st.binary(min_size=1, max_size=4)) + payload[at:]
    # pad with whitespace to just around the size limit
    size = data.draw(st.sampled_from([MAX - 1, MAX, MAX + 1, MAX + 7]))
    return payload + b" " * max(0, size - len(payload))


@PURE
@given(st.data())
def test_parse_control_raises_only_service_errors_with_the_documented_code(data):
    kind = data.draw(st.sampled_from(["bytes", "json", "request", "request"]))
    if kind == "bytes":
        payload = data.draw(st.binary(max_size=300))
    else:
        document = data.draw(json_values() if kind == "json" else request_like)
        ensure_ascii = data.draw(st.booleans())
        payload = json.dumps(document, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
        payload = mangle(data, payload)
    check_parse_control(payload)


@settings(max_examples=examples(50), deadline=None, database=None)
@example(depth=5000)
@given(depth=st.integers(1, MAX // 2))
def test_parse_control_deeply_nested_json_is_bad_json(depth):
    for payload in (b"[" * depth, b"[" * depth + b"]" * depth,
                    b'{"command":"status","correlation_id":' + b"[" * depth + b"]" * depth + b"}"):
        check_parse_control(payload)


@pytest.mark.filterwarnings("ignore:Unexpected end-group tag:RuntimeWarning")
@PURE
@given(st.data())
def test_parse_handshake_raises_only_service_errors(data):
    kind = data.draw(st.sampled_from(["bytes", "request", "request+junk", "big"]))
    if kind == "bytes":
        payload = data.draw(st.binary(max_size=300))
    elif kind == "big":
        payload = Request(requested_model="m" * data.draw(st.integers(MAX - 8, MAX + 8))) \
            .SerializeToString()
    else:
        name = data.draw(st.text(max_size=40))
        payload = Request(requested_model=name).SerializeToString()
        if kind == "request+junk":
            payload = mangle(data, payload + data.draw(st.binary(max_size=20)))
        else:
            assert wire.parse_handshake(payload) == name
            return
    try:
        name = wire.parse_handshake(payload)
    except ServiceError as error:
        assert error.code in (errors.BAD_REQUEST, errors.TOO_LARGE, errors.BAD_PARAM)
        assert (error.code == errors.TOO_LARGE) == (len(payload) > MAX)
        if error.code == errors.BAD_PARAM:
            assert len(Request.FromString(payload).requested_model) > 1024
        return
    assert isinstance(name, str) and len(payload) <= MAX and len(name) <= 1024


# --- configs ---------------------------------------------------------------------------

def _original_config():
    with open(ORIGINAL_CONFIG) as stream:
        return json.load(stream)


def _shipped_config():
    with open(SHIPPED_CONFIG) as stream:
        return yaml.safe_load(stream)


BASE_CONFIGS = [_original_config(), _shipped_config()]
for _document in BASE_CONFIGS:
    assert config.validate(_document) == [], _document


def _schema_keys(node, found):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                found.update(value)
            _schema_keys(value, found)
    elif isinstance(node, list):
        for value in node:
            _schema_keys(value, found)
    return found


SCHEMA_KEYS = sorted(_schema_keys(config.schema(), set()) | {"llama3", "reference", "demo"})
config_keys = st.sampled_from(SCHEMA_KEYS) | st.text(max_size=12)
# Values that sometimes satisfy the schema's patterns, so mutations get past the first check.
config_scalars = (st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats()
                  | st.text(max_size=20)
                  | st.sampled_from(["ipc:///tmp/x", "tcp://127.0.0.1:1", "tcp://", "/abs",
                                     "rel", "0660", "0999", "660", "512M", "1.5G", "infinity",
                                     "200%", "200", "INFO", "info", "Info", "auto", "systemd",
                                     "process", "", "{python}", "llama3", "qwen3", "demo",
                                     "Llama-3.1-8B-Instruct", "reference"]))
config_values = st.recursive(
    config_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(config_keys, children, max_size=4),
    max_leaves=10)


def _containers(node, path=()):
    if isinstance(node, (dict, list)):
        yield path
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            yield from _containers(value, path + (key,))


def _at(node, path):
    for part in path:
        node = node[part]
    return node


def _near_miss(key):
    return st.sampled_from([key.upper(), key.lower().capitalize(), key[:-1], key + "s",
                            key.replace("_", "-"), key.replace("_", ""), " " + key, key[1:]])


@st.composite
def mutated_configs(draw):
    document = copy.deepcopy(draw(st.sampled_from(BASE_CONFIGS)))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(_containers(document))))
        node = _at(document, path)
        op = draw(st.sampled_from(["delete", "rename", "retype", "add"]))
        if isinstance(node, dict):
            if not node or op == "add":
                node[draw(config_keys)] = draw(config_values)
                continue
            key = draw(st.sampled_from(sorted(node)))
            if op == "delete":
                del node[key]
            elif op == "rename":
                new = draw(_near_miss(key) | config_keys)
                node[new] = node.pop(key)
            else:
                node[key] = draw(config_values)
        else:
            if not node or op == "add":
                node.append(draw(config_values))
                continue
            index = draw(st.integers(0, len(node) - 1))
            if op == "delete":
                del node[index]
            elif op == "rename":      # duplicate an entry, sometimes with its name's case changed
                entry = copy.deepcopy(node[index])
                if isinstance(entry, dict) and isinstance(entry.get("name"), str) and draw(
                        st.booleans()):
                    entry["name"] = entry["name"].swapcase()
                node.append(entry)
            else:
                node[index] = draw(config_values)
    return document


def _parse_path(line):
    """The field path a problem line starts with, as a list of keys; AssertionError if none."""
    if line.startswith("(top level): "):
        return []
    parts, pos = [], 0
    while True:
        if line.startswith("[", pos):
            if line[pos + 1:pos + 2].isdigit():
                end = line.index("]", pos)
                parts.append(int(line[pos + 1:end]))
            else:
                assert line[pos + 1:pos + 2] == '"', line
                key, end = json.JSONDecoder().raw_decode(line, pos + 1)
                assert line[end] == "]", line
                parts.append(key)
            pos = end + 1
        else:
            if parts:
                assert line[pos] == ".", line
                pos += 1
            end = pos
            while end < len(line) and line[end] not in ".[: ":
                end += 1
            name = line[pos:end]
            assert name.isidentifier(), (name, line)
            parts.append(name)
            pos = end
        if line.startswith(": ", pos):
            return parts
        assert pos < len(line) and line[pos] in ".[", line


def check_validate(document):
    lines = config.validate(document)
    assert isinstance(lines, list)
    for line in lines:
        assert isinstance(line, str) and line, lines
        path = _parse_path(line)
        # Everything but the last part exists in the document (the last may be missing,
        # e.g. "missing (required)").
        node = document
        for part in path[:-1]:
            assert isinstance(node, (dict, list)), (line, path)
            node = node[part]
        if path:
            assert isinstance(node, (dict, list)), (line, path)
    return lines


def check_from_document(document):
    try:
        cfg = config.from_document(document, "fuzz.yaml")
    except config.ConfigError as error:
        assert error.problems, document
        assert all(p.startswith("fuzz.yaml: ") for p in error.problems), error.problems
        return None
    assert isinstance(cfg, config.Config)
    assert cfg.models and all(isinstance(spec, config.ModelSpec) for spec in cfg.models.values())
    return cfg


@CONFIGS
@given(json_values(max_leaves=25, keys=config_keys))
def test_validate_random_documents(document):
    lines = check_validate(document)
    if not isinstance(document, dict):
        assert len(lines) == 1 and lines[0].startswith("(top level): ")
    check_from_document(document)


@CONFIGS
@given(mutated_configs())
def test_validate_and_convert_mutated_configs(document):
    lines = check_validate(document)
    cfg = check_from_document(document)
    assert (cfg is None) == bool(lines), lines


# YAML (the shipped format) also gives mappings with non-string keys: `1: x`, `true: x`,
# `2024-01-01: x`, `null: x`.
yaml_keys = (st.integers(-3, 3) | st.booleans() | st.none() | st.floats(allow_nan=False)
             | st.dates())


@st.composite
def configs_with_yaml_keys(draw):
    document = copy.deepcopy(draw(st.sampled_from(BASE_CONFIGS)))
    path = draw(st.sampled_from([p for p in _containers(document)
                                 if isinstance(_at(document, p), dict)]))
    _at(document, path)[draw(yaml_keys)] = draw(config_values)
    return document


@settings(max_examples=examples(200), deadline=None, database=None)
@example(document={"model_backends": {"r": "x.py"},
                   "supported_models": [{"name": "a", "type": "r"}], "logging": {1: "x"}})
@given(configs_with_yaml_keys())
def test_validate_configs_with_non_string_yaml_keys(document):
    check_validate(document)
    check_from_document(document)


# =====================================================================================
# 2. The real daemon under a flood of random frames
# =====================================================================================

UNICODE_POOL = (string.ascii_letters + string.digits + string.punctuation + " \t\n\x00\x7f"
                + "éßøΩЖ中文🙂\u200b\ufeff\U0010ffff" + "\ud800\udfff\udc80")


def random_text(rng, max_len=24):
    return "".join(rng.choice(UNICODE_POOL) for _ in range(rng.randint(0, max_len)))


def random_json(rng, depth=0):
    roll = rng.random()
    if depth > 3 or roll < 0.55:
        return rng.choice([
            None, True, False, 0, -1, 2**63, -(2**70), 1.5, -0.0, 1e308, float("nan"),
            float("inf"), rng.randint(-10**6, 10**6), rng.random(), random_text(rng),
            "", "demo", "status", str(uuid.UUID(int=rng.getrandbits(128)))])
    if roll < 0.8:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng, 8): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def random_model_name(rng):
    return rng.choice([
        None, "", "demo", "DEMO", "Demo", "demo ", " demo", "demo\x00", "dem0", "nope",
        random_text(rng), rng.randint(-5, 5), True, [], {}, ["demo"], {"name": "demo"},
        1.0, "x" * rng.randint(1000, 60000), random_json(rng)])


def random_request(rng):
    message = {}
    roll = rng.random()
    if roll < 0.6:
        message["command"] = rng.choice(["status", "list-models", "load-model", "unload-model"])
    elif roll < 0.72:
        message["command"] = random_text(rng)
    elif roll < 0.78:
        message["command"] = rng.choice(["STATUS", "Status", "status ", "load_model",
                                         "stop", "list", "help", ""])
    elif roll < 0.9:
        message["command"] = random_json(rng)
    roll = rng.random()
    if roll < 0.65:
        params = {"model_name": random_model_name(rng)} if rng.random() < 0.85 else {}
        for _ in range(rng.randint(0, 2)):
            params[random_text(rng, 8)] = random_json(rng)
        message["params"] = params
    elif roll < 0.72:
        message["params"] = None
    elif roll < 0.82:
        message["params"] = rng.choice([[], [1], "demo", 3, True, [{"model_name": "demo"}]])
    roll = rng.random()
    if roll < 0.5:
        message["correlation_id"] = str(uuid.UUID(int=rng.getrandbits(128)))
    elif roll < 0.9:
        message["correlation_id"] = random_json(rng)
    if rng.random() < 0.1:
        message[random_text(rng, 8)] = random_json(rng)
    keys = list(message)
    rng.shuffle(keys)
    return {key: message[key] for key in keys}


def encode_json(rng, document):
    ensure_ascii = rng.random() < 0.7
    text = json.dumps(document, ensure_ascii=ensure_ascii)
    if rng.random() < 0.1:
        text = rng.choice([" ", "\n", "\t"]) + text + rng.choice(["", " ", "\n"])
    return text.encode("utf-8", "surrogatepass")   # lone surrogates: invalid UTF-8


def random_control_payload(rng):
    roll = rng.random()
    if roll < 0.55:
        return encode_json(rng, random_request(rng))
    if roll < 0.65:
        return rng.randbytes(rng.choice([rng.randint(0, 64), rng.randint(0, 3000)]))
    if roll < 0.68:
        return b""
    if roll < 0.75:
        return encode_json(rng, random_json(rng))
    if roll < 0.8:       # huge: random bytes or a request around / past the 64 KiB limit
        size = rng.choice([MAX - 1, MAX, MAX + 1, rng.randint(1000, MAX),
                           rng.randint(MAX, 200 * 1024)])
        if rng.random() < 0.3:
            return rng.randbytes(size)
        command = rng.choice(["status", "load-model", "unload-model", "nope"])
        head = json.dumps({"command": command, "params": {"model_name": ""},
                           "correlation_id": "big"}).encode()
        return json.dumps({"command": command, "params": {"model_name": "x" * max(
            1, size - len(head))}, "correlation_id": "big"}).encode()
    if roll < 0.95:      # a request, then broken
        payload = encode_json(rng, random_request(rng))
        at = rng.randrange(len(payload))
        how = rng.choice(["truncate", "flip", "insert", "bom"])
        if how == "truncate":
            return payload[:at]
        if how == "flip":
            return payload[:at] + bytes([payload[at] ^ rng.randint(1, 255)]) + payload[at + 1:]
        if how == "insert":
            return payload[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00",
                                              b"}", b'"']) + payload[at:]
        return b"\xef\xbb\xbf" + payload
    # nested JSON, below the depth at which json.loads itself gives up (see the xfail above)
    depth = rng.randint(1, 200)
    return (b'{"command":"status","correlation_id":' + b"[" * depth + b"]" * depth + b"}"
            if rng.random() < 0.5 else b"[" * depth + b"]" * depth)


def safe_control_payload(rng):
    """A random payload that neither loads a real model nor stops the service."""
    while True:
        payload = random_control_payload(rng)
        expected, _ = control_oracle(payload)
        if expected not in ("LOADS", "STOPS"):
            return payload


def dealer_frames(rng, payload_factory):
    """Frames a DEALER sends: mostly one payload frame, sometimes 2-4 (empty ones often)."""
    if rng.random() < 0.85:
        return [payload_factory(rng)]
    return [b"" if rng.random() < 0.45 else payload_factory(rng)
            for _ in range(rng.randint(2, 4))]


def expected_envelope(frames):
    """For frames as sent by a DEALER: (prefix the reply comes back with, payload or None).

    None means bad_frames: the reply still comes back, with the envelope up to the first
    empty delimiter (or the identity alone).
    """
    if len(frames) == 1:
        return [], frames[0]
    if len(frames) == 2 and frames[0] == b"":
        return [b""], frames[1]
    if b"" in frames:
        return frames[:frames.index(b"") + 1], None
    return [], None


def check_control_reply(reply_payload, payload, where):
    reply = json.loads(reply_payload)
    assert isinstance(reply, dict), where
    if payload is None:
        expected, correlation_id = frozenset({errors.BAD_FRAMES}), None
    else:
        expected, correlation_id = control_oracle(payload)
    if expected is True:
        assert reply["success"] is True, (where, reply)
        assert isinstance(reply["data"], dict)
        outcome = "success"
    else:
        assert reply["success"] is False, (where, reply)
        assert reply["code"] in KNOWN_CODES, (where, reply)
        assert reply["code"] in expected, (where, expected, reply)
        assert isinstance(reply["error"], str) and reply["error"], (where, reply)
        outcome = reply["code"]
    assert same_json(reply["correlation_id"], correlation_id), (where, reply, correlation_id)
    return outcome


def describe(frames):
    return [f[:80] + (b"...(%d bytes)" % len(f) if len(f) > 80 else b"") for f in frames]


def flood_dealers(daemon, endpoint, messages, check, seed, outcomes, sockets=6, batch=40):
    """Send every message (a frame list) from DEALERs, batch by batch; check each reply.

    ``check(reply payload, request payload or None for bad frames, where)`` returns a label
    counted in ``outcomes``.
    """
    dealers = [daemon.socket(zmq.DEALER, endpoint) for _ in range(sockets)]
    try:
        for start in range(0, len(messages), batch):
            sock = dealers[(start // batch) % len(dealers)]
            chunk = messages[start:start + batch]
            for frames in chunk:
                sock.send_multipart(frames)
            for offset, frames in enumerate(chunk):
                index = start + offset
                where = f"seed {seed}, message {index}: {describe(frames)}"
                assert sock.poll(REPLY_TIMEOUT_MS), f"no reply within 5 s; {where}"
                reply = sock.recv_multipart()
                prefix, payload = expected_envelope(frames)
                assert reply[:-1] == prefix, (where, reply)
                outcomes[check(reply[-1], payload, where)] += 1
        for sock in dealers:          # exactly one reply each: nothing extra arrives
            assert not sock.poll(50), f"seed {seed}: an extra reply arrived"
    finally:
        for sock in dealers:
            sock.close(linger=0)


def flood_req(daemon, endpoint, messages, check, seed, outcomes):
    """REQ: one request at a time; the reply is one frame, whatever the frames were."""
    sock = daemon.socket(zmq.REQ, endpoint)
    try:
        for index, frames in enumerate(messages):
            where = f"seed {seed}, REQ message {index}: {describe(frames)}"
            sock.send_multipart(frames)
            assert sock.poll(REPLY_TIMEOUT_MS), f"no reply within 5 s; {where}"
            reply = sock.recv_multipart()
            assert len(reply) == 1, (where, reply)
            outcomes[check(reply[0], frames[0] if len(frames) == 1 else None, where)] += 1
    finally:
        sock.close(linger=0)


def rss(daemon):
    return psutil.Process(daemon.process.pid).memory_info().rss


def assert_healthy(daemon):
    assert daemon.process.poll() is None, f"daemon exited:\n{daemon.log()[-3000:]}"
    assert psutil.Process(daemon.process.pid).status() != psutil.STATUS_ZOMBIE
    started = time.monotonic()
    reply = daemon.request("status", timeout=1.0)
    elapsed = time.monotonic() - started
    assert reply["success"] and reply["data"]["service_status"] == "running", reply
    return reply, elapsed


def test_control_socket_flood(daemon_factory):
    seed = fuzz_seed()
    rng = random.Random(seed)
    daemon = daemon_factory({"demo": []}, default_model="demo")
    dealer_messages = [dealer_frames(rng, safe_control_payload) for _ in range(3000)]
    req_messages = [[safe_control_payload(rng)] if rng.random() < 0.85 else
                    [safe_control_payload(rng) for _ in range(rng.randint(2, 3))]
                    for _ in range(300)]
    warmup, dealer_messages = dealer_messages[:200], dealer_messages[200:]
    half = len(dealer_messages) // 2
    check, outcomes = check_control_reply, Counter()

    rss_fresh = rss(daemon)
    flood_dealers(daemon, daemon.control_endpoint, warmup, check, seed, Counter())
    before = daemon.request("status")["data"]["requests"]["control"]
    rss_before = rss(daemon)
    started = time.monotonic()
    flood_dealers(daemon, daemon.control_endpoint, dealer_messages[:half], check, seed, outcomes)
    rss_half = rss(daemon)
    flood_dealers(daemon, daemon.control_endpoint, dealer_messages[half:], check, seed, outcomes)
    flood_req(daemon, daemon.control_endpoint, req_messages, check, seed, outcomes)
    elapsed = time.monotonic() - started
    rss_after = rss(daemon)

    reply, status_time = assert_healthy(daemon)
    sent = len(dealer_messages) + len(req_messages)
    # Every message was received and counted once (+1: the status request just made).
    assert reply["data"]["requests"]["control"] == before + sent + 1, reply["data"]["requests"]
    assert reply["data"]["models"] == [], "the flood must not have started a backend"
    assert daemon.backend_pids() == []
    mib = 1024 * 1024
    print(f"control flood: {sent} messages ({len(req_messages)} from REQ) in {elapsed:.2f} s; "
          f"status after {status_time * 1000:.1f} ms; RSS fresh {rss_fresh / mib:.1f} MiB, "
          f"before {rss_before / mib:.1f} MiB, half-way {rss_half / mib:.1f} MiB, after "
          f"{rss_after / mib:.1f} MiB (growth {(rss_after - rss_before) / mib:+.2f} MiB, "
          f"second half {(rss_after - rss_half) / mib:+.2f} MiB); replies: "
          f"{dict(outcomes.most_common())}")
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, (rss_before, rss_after)


def test_control_deeply_nested_json_gets_bad_json(daemon_factory):
    daemon = daemon_factory({"demo": []})
    for payload in (b"[" * 5000, b'{"command":"status","correlation_id":' + b"[" * 3000
                    + b"]" * 3000 + b"}"):
        frames = daemon.send_raw([payload], timeout=5)
        reply = json.loads(frames[0])
        assert_healthy(daemon)
        assert reply["success"] is False and reply["code"] == errors.BAD_JSON, reply


def random_handshake_payload(rng):
    roll = rng.random()
    if roll < 0.45:
        text = random_text(rng).encode("utf-8", "replace").decode()   # no lone surrogates
        name = rng.choice(["demo", "", "DEMO", "demo ", "nope", text,
                           "x" * rng.randint(100, 5000)])
        return Request(requested_model=name).SerializeToString()
    if roll < 0.6:
        return rng.randbytes(rng.randint(0, 200))
    if roll < 0.65:
        return b""
    if roll < 0.7:
        size = rng.choice([MAX - 3, MAX - 2, MAX + 1, rng.randint(MAX, 200 * 1024)])
        return Request(requested_model="y" * size).SerializeToString()[:size + 3]
    if roll < 0.8:        # a valid Request with junk appended / truncated / bytes flipped
        payload = Request(requested_model=rng.choice(["demo", "nope"])).SerializeToString()
        payload += rng.randbytes(rng.randint(0, 10))
        at = rng.randrange(len(payload))
        return rng.choice([payload[:at], payload[:at] + bytes([rng.randrange(256)])
                           + payload[at + 1:]])
    if roll < 0.9:        # field 1 with the wrong wire type, unknown fields, bad UTF-8
        return rng.choice([b"\x08\x01", b"\x0d\x00\x00\x00\x00", b"\x0a\x02\xff\xfe",
                           b"\x0a\x04demo\x10\x05", b"\x12\x04demo", b"\x0a\x7fdemo",
                           b"\x0a\x04demo\x0a\x04nope", b"\x0a\x04nope\x0a\x04demo",
                           b"\x0b", b"\x0c", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"])
    return json.dumps({"requested_model": "demo"}).encode()   # JSON on the protobuf socket


def make_handshake_check(endpoint):
    def check(reply_payload, payload, where):
        response = Response.FromString(reply_payload)
        name = None
        if payload is not None and len(payload) <= MAX:
            try:
                name = Request.FromString(payload).requested_model or "demo"   # default_model
            except Exception:
                name = None
        if name == "demo":
            assert (response.model_ipc_endpoint, list(response.protocols),
                    response.error_message) == (endpoint, ["ping", "sleep"], ""), (where, response)
            return "endpoint"
        assert response.error_message, (where, response)
        assert response.model_ipc_endpoint == "" and not response.protocols, (where, response)
        return "bad frames" if payload is None else "error_message"
    return check


@pytest.mark.filterwarnings("ignore:Unexpected end-group tag:RuntimeWarning")
def test_handshake_socket_flood(daemon_factory):
    """Loads the reference backend 'demo' first (so some handshakes succeed), unloads it after."""
    seed = fuzz_seed()
    rng = random.Random(seed)
    daemon = daemon_factory({"demo": []}, default_model="demo")
    loaded = daemon.load("demo")
    assert loaded["success"], loaded
    check = make_handshake_check(loaded["data"]["endpoint"])
    dealer_messages = [dealer_frames(rng, random_handshake_payload) for _ in range(2500)]
    req_messages = [[random_handshake_payload(rng)] if rng.random() < 0.85 else
                    [random_handshake_payload(rng) for _ in range(2)] for _ in range(300)]
    outcomes = Counter()
    flood_dealers(daemon, daemon.handshake_endpoint, dealer_messages[:200], check, seed,
                  Counter())
    before = daemon.request("status")["data"]["requests"]["handshake"]
    rss_before = rss(daemon)
    started = time.monotonic()
    flood_dealers(daemon, daemon.handshake_endpoint, dealer_messages[200:], check, seed,
                  outcomes)
    flood_req(daemon, daemon.handshake_endpoint, req_messages, check, seed, outcomes)
    elapsed = time.monotonic() - started
    rss_after = rss(daemon)
    reply, status_time = assert_healthy(daemon)
    sent = len(dealer_messages) - 200 + len(req_messages)
    assert reply["data"]["requests"]["handshake"] == before + sent
    assert [m["state"] for m in reply["data"]["models"]] == ["ready"]
    unloaded = daemon.request("unload-model", {"model_name": "demo"}, timeout=15)
    assert unloaded["success"], unloaded
    mib = 1024 * 1024
    print(f"handshake flood: {sent} messages in {elapsed:.2f} s; status after "
          f"{status_time * 1000:.1f} ms; RSS {rss_before / mib:.1f} -> {rss_after / mib:.1f} MiB "
          f"({(rss_after - rss_before) / mib:+.2f} MiB); replies: {dict(outcomes)}")
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, (rss_before, rss_after)


# =====================================================================================
# 3. Fairness: a flooding client does not starve another
# =====================================================================================

FLOOD = 5000
FAIR_LIMIT = 2.0


def test_status_flood_does_not_starve_another_client(daemon_factory):
    daemon = daemon_factory({"demo": []})
    base = daemon.request("status")["data"]["requests"]["control"]
    request = wire.encode_control_request("status", None, "flood")
    flooding = threading.Event()
    sent = []

    def flood():
        sock = daemon.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)           # queue everything; never read a reply
        sock.setsockopt(zmq.SNDTIMEO, 5000)
        try:
            for index in range(FLOOD):
                sock.send(request)
                sent.append(index)
                if index == 500:
                    flooding.set()
        finally:
            flooding.set()
            time.sleep(0.5)
            sock.close(linger=0)

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    assert flooding.wait(10)
    latencies, during = [], 0
    sock = daemon.socket(zmq.DEALER)
    try:
        for index in range(20):
            correlation_id = f"fair-{index}"
            started = time.monotonic()
            sock.send(wire.encode_control_request("status", None, correlation_id))
            assert sock.poll(int(FAIR_LIMIT * 1000) + 1000), \
                f"request {index} got no reply within {FAIR_LIMIT + 1} s"
            reply = json.loads(sock.recv())
            latency = time.monotonic() - started
            latencies.append(latency)
            assert reply["correlation_id"] == correlation_id and reply["success"], reply
            # Answered while the flood was still being worked through?
            if reply["data"]["requests"]["control"] < base + FLOOD + index + 1:
                during += 1
    finally:
        sock.close(linger=0)
    flooder.join(15)
    assert_healthy(daemon)
    print(f"fairness: {len(sent)} flooded status requests; 20 interleaved requests, "
          f"{during} answered while the flood was in progress; latency max "
          f"{max(latencies) * 1000:.1f} ms, median "
          f"{sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms")
    assert len(sent) == FLOOD
    assert during >= 1, "the flood was over before the second client's first request"
    assert max(latencies) < FAIR_LIMIT, latencies
