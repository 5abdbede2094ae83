"""Local services a node offers to the network: OCF's service registry.

``node.services`` is the :class:`~ocf.services.registrar.Registrar`: it
health-checks and publishes configured services (``--service.name/port``)
and internal ones (the job tracker's ``jobs``), and tells the gateway where
``/v1/_service/<name>`` goes.
"""

from .registrar import InternalService, LocalService, Registrar, open_registrar, parse_models

__all__ = ["InternalService", "LocalService", "Registrar", "open_registrar", "parse_models"]
