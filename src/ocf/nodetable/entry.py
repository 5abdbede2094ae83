"""Node table entries: OCF's shape, validation of updates, hardware detection.

An entry describes one peer (``id``, ``owner``, ``role``, ``status``,
``version``, ``public_address``, ``addrs``, ``service``, ``hardware``) as OCF
users know it. ``last_seen``, ``connected`` and ``load`` change constantly,
so they are *not* part of the replicated document; they are added to the
served view from liveness (see :mod:`ocf.nodetable.table`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from ..errors import ValidationError

# Fields an owner may set through POST /v1/dnt/_node (the rest are derived).
UPDATABLE = {"owner", "role", "status", "public_address", "service", "hardware"}
STATUSES = {"online", "offline", "left", "maintenance"}
MAX_SERVICES = 64
MAX_TEXT = 256


def detect_hardware() -> dict[str, Any]:
    """GPUs via nvidia-smi when present, host memory from /proc/meminfo, CPU count."""
    gpus: list[dict[str, Any]] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            for line in out.strip().splitlines():
                name, total, used = (part.strip() for part in line.split(","))
                gpus.append({"name": name, "total_memory": int(float(total)), "used_memory": int(float(used))})
        except (OSError, subprocess.SubprocessError, ValueError):
            gpus = []
    mem_total = mem_used = 0
    try:
        info: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
        mem_total = info.get("MemTotal", 0)
        mem_used = mem_total - info.get("MemAvailable", 0)
    except (OSError, ValueError, IndexError):
        pass
    return {"gpus": gpus, "host_memory": mem_total, "host_memory_used": mem_used, "cpus": os.cpu_count() or 0}


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValidationError(f"'{field}' must be a string of at most {MAX_TEXT} characters")
    return value


def validate_service(service: Any) -> dict[str, Any]:
    if not isinstance(service, dict):
        raise ValidationError("each service must be an object with 'name'")
    name = _text(service.get("name"), "service.name")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValidationError(f"service name {name!r} may only contain letters, digits, '-' and '_'")
    groups = service.get("identity_group", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and "=" in g and len(g) <= MAX_TEXT for g in groups):
        raise ValidationError("service.identity_group must be a list of 'key=value' strings")
    port = service.get("port", "")
    if not isinstance(port, (int, str)) or isinstance(port, bool):
        raise ValidationError("service.port must be a number or string")
    out = {
        "name": name,
        "host": _text(service.get("host", "localhost"), "service.host"),
        "port": str(port),
        "status": _text(service.get("status", "healthy"), "service.status"),
        "identity_group": list(groups),
        "hardware": service.get("hardware", {}) if isinstance(service.get("hardware", {}), dict) else {},
    }
    for key, value in service.items():  # keep extra fields the registrar adds (e.g. models), if simple
        if key not in out and isinstance(value, (str, int, float, bool, list)):
            out[key] = value
    return out


def validate_update(fields: Any) -> dict[str, Any]:
    """Check a POST /v1/dnt/_node body; returns the normalized fields to merge."""
    if not isinstance(fields, dict):
        raise ValidationError("body must be a JSON object")
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise ValidationError(
            f"unknown or read-only field(s): {', '.join(sorted(unknown))}; updatable: {', '.join(sorted(UPDATABLE))}"
        )
    out: dict[str, Any] = {}
    if "owner" in fields:
        out["owner"] = _text(fields["owner"], "owner")
    if "public_address" in fields:
        out["public_address"] = _text(fields["public_address"], "public_address")
    if "status" in fields:
        status = _text(fields["status"], "status")
        if status not in STATUSES:
            raise ValidationError(f"status must be one of {', '.join(sorted(STATUSES))}")
        out["status"] = status
    if "role" in fields:
        role = fields["role"]
        if not isinstance(role, list) or not all(isinstance(r, str) and len(r) <= MAX_TEXT for r in role):
            raise ValidationError("role must be a list of strings")
        out["role"] = role
    if "service" in fields:
        services = fields["service"]
        if not isinstance(services, list) or len(services) > MAX_SERVICES:
            raise ValidationError(f"service must be a list of at most {MAX_SERVICES} services")
        out["service"] = [validate_service(s) for s in services]
    if "hardware" in fields:
        if not isinstance(fields["hardware"], dict):
            raise ValidationError("hardware must be an object")
        out["hardware"] = fields["hardware"]
    return out
