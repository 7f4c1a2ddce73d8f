"""Joining a Ray cluster and placing the evaluation actors on it.

The driver (the process running :func:`evo_subens.run`) connects to ``workers.address``, else
``RAY_ADDRESS``, else starts a local Ray. Actors ask for ``workers.threads_per_actor`` CPUs,
``workers.num_gpus_per_actor`` GPUs and the custom ``workers.resources``; with ``workers.placement``
``spread`` or ``pack`` they are scheduled into one placement group holding one bundle per actor.
Requests the cluster can never satisfy are refused with a :class:`~evo_subens.errors.ConfigError`
before anything waits on them. Actors never write files: the run directory is the driver's.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from . import reaper
from .watch import Watch
from .config import RunConfig, WorkersConfig
from ..errors import ConfigError, UserError
from .rundir import check_output_folder, check_run_name

LOCAL_NODE = "local"  # the node column of candidates evaluated in the driver's own process
CONNECT_TIMEOUT_S = 5.0
PLACEMENT_WAIT_LOG_S = 30.0
JOB_CWD_WAIT_S = 5.0
# Set by Ray's job supervisor in the environment of a driver started by `ray job submit`.
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"

log = logging.getLogger(__name__)


def resolve_address(configured: str | None) -> tuple[str | None, str]:
    """The cluster to join and where that choice came from: ``workers.address`` (the ``--address``
    flag sets it), else ``RAY_ADDRESS``, else ``(None, ...)`` for a Ray of this process's own."""
    if configured:
        return configured, "workers.address"
    from_env = os.environ.get("RAY_ADDRESS") or None
    if from_env:
        return from_env, "workers.address (from RAY_ADDRESS)"
    return None, "workers.address"


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for other forms (``auto``)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, field: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an address nothing listens on: Ray itself would retry connecting to it forever."""
    parsed = _host_port(address)
    if parsed is None:
        return
    try:
        with socket.create_connection(parsed, timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(field, f"the address of a running Ray cluster's head node (host:port; nothing "
                                 f"answered at {parsed[0]}:{parsed[1]}: {exc.strerror or exc})", address) from None


class _TokenNotice(logging.Filter):
    """Drops Ray's warning that token authentication is on, which it prints on every local start: it is
    the expected setting (kept on), and the progress output says so in a line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TokenNotice())


def token_authentication() -> bool:
    """Whether this process talks to Ray with token authentication (after :func:`connect`)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def token_settings(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str:
    """What this process sends a cluster with token authentication, naming the setting that is missing
    (Ray refuses a missing or wrong token alike, as a failure to connect, so the settings are all there is
    to go on)."""
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return ("this process does not use it: RAY_AUTH_MODE is not 'token' here (the token file alone is not "
                "enough); export RAY_AUTH_MODE=token in the driver's environment, as on every node")
    if environ.get("RAY_AUTH_TOKEN"):
        source = "RAY_AUTH_TOKEN"
    elif environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            return f"RAY_AUTH_TOKEN_PATH names {path}, which does not exist; point it at the cluster's token file"
        source = f"RAY_AUTH_TOKEN_PATH ({path})"
    else:
        path = (home or Path.home()) / ".ray" / "auth_token"
        if not path.is_file():
            return (f"RAY_AUTH_MODE=token but this process has no token: copy the cluster's {path} here, or set "
                    f"RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
        source = str(path)
    return f"the token this process sends, from {source}, must be the one the cluster was started with"


def connect(address: str | None, local_runtime_env: dict | None = None) -> None:
    """Join the cluster at ``address`` (see :func:`resolve_address`) or start a local Ray, once per process.

    Token authentication is left as Ray configures it (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN[_PATH]``,
    ``~/.ray/auth_token``); an address that is down, or that refuses this process's token, is a
    :class:`UserError` naming ``workers.address``.
    """
    if ray.is_initialized():
        return
    address, field = resolve_address(address)
    if address is None:
        reaper.start()  # before ray.init: a Ray this process starts ends with it, even killed while it starts
        ray.init(include_dashboard=False, runtime_env=local_runtime_env)
        return
    check_reachable(address, field)
    cwd = os.getcwd()
    try:
        ray.init(address=address)
        _return_to(cwd)
    except (ConnectionError, ValueError, RuntimeError, ray.exceptions.AuthenticationError) as exc:
        # Ray reports a refused token as a failure to connect, after retrying for about 30 s.
        raise UserError(f"config field '{field}': cannot join the Ray cluster at {address!r} ({exc}); check "
                        f"that it is a running head node's host:port; if the cluster uses token authentication: "
                        f"{token_settings()}") from None


def _stale(cwd: str) -> bool:
    """Whether this process sits in a folder that is no longer the one at path ``cwd``."""
    try:
        return os.stat(".").st_ino != os.stat(cwd).st_ino
    except FileNotFoundError:
        return True


def _return_to(cwd: str, wait_s: float = JOB_CWD_WAIT_S, settle_s: float = 1.0) -> None:
    """In a ``ray job submit`` driver, step into the job's working directory again once joining Ray has
    replaced it: during ``ray.init`` or up to about a second later, Ray unpacks the working directory anew
    at the same path, which left the driver in a deleted folder (``os.getcwd()`` then failed, inside
    torch's first optimizer). Watches for ``wait_s`` at most, and ``settle_s`` after stepping back in."""
    if not os.environ.get(JOB_DRIVER_ENV):
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _stale(cwd):
            try:
                os.chdir(cwd)
                deadline = min(deadline, time.monotonic() + settle_s)
            except FileNotFoundError:  # removed, not yet unpacked again
                pass
        time.sleep(0.05)


def actor_bundle(workers: WorkersConfig, gpus_per_actor: float) -> dict[str, float]:
    """The resources one evaluation actor reserves (one placement-group bundle)."""
    bundle = {"CPU": float(workers.threads_per_actor)}
    if gpus_per_actor > 0:
        bundle["GPU"] = float(gpus_per_actor)
    bundle.update({name: float(amount) for name, amount in workers.resources.items()})
    return bundle


def placeable_actors(bundle: dict[str, float], nodes: list[dict]) -> int:
    """How many actors of ``bundle`` the alive ``nodes`` (``ray.nodes()`` rows) can hold at once.

    Identical bundles pack independently per node, so this count is exact, not a heuristic.
    """
    total = 0
    for node in nodes:
        if not node.get("Alive", False):
            continue
        have = node.get("Resources", {})
        # A small tolerance: Ray stores fractional resources in fixed point.
        total += min(math.floor(have.get(name, 0.0) / amount + 1e-9) for name, amount in bundle.items())
    return total


def check_placeable(workers: WorkersConfig, num_actors: int, gpus_per_actor: float) -> None:
    """Refuse ``num_actors`` actors that no arrangement on the cluster's nodes can hold (Ray would wait
    for them forever); names the field to change."""
    nodes = [n for n in ray.nodes() if n.get("Alive", False)]
    known = set().union(*(n.get("Resources", {}) for n in nodes)) if nodes else set()
    missing = sorted(set(workers.resources) - known)
    if missing:
        raise ConfigError("workers.resources", f"resources some node of the Ray cluster has (none has "
                                               f"{', '.join(missing)}; start nodes with "
                                               f"`ray start --resources '{{\"{missing[0]}\": N}}'`)",
                          workers.resources)
    bundle = actor_bundle(workers, gpus_per_actor)
    fits = placeable_actors(bundle, nodes)
    if fits >= num_actors:
        return
    if workers.resources and placeable_actors({"CPU": bundle["CPU"]}, nodes) >= num_actors:
        raise ConfigError("workers.resources", f"per-actor resources {num_actors} actors can get at once "
                                               f"(the nodes hold {fits} actors of {bundle})", workers.resources)
    raise ConfigError("workers.num_actors", f"at most {fits} actors of {bundle} (what the nodes of the Ray "
                                            f"cluster can hold at once)", num_actors)


def make_placement_group(workers: WorkersConfig, num_actors: int, gpus_per_actor: float) -> PlacementGroup | None:
    """A placement group of one bundle per actor (``workers.placement``: spread / pack), ready to use;
    None for ``placement: none``. The caller removes it (:func:`remove_placement_group`)."""
    if workers.placement == "none":
        return None
    bundle = actor_bundle(workers, gpus_per_actor)
    group = placement_group([dict(bundle) for _ in range(num_actors)], strategy=workers.placement.upper(),
                            name=f"evo-subens-{os.getpid()}")
    started = time.monotonic()
    # Placeable (checked before) but possibly busy: wait, saying why, rather than fail a long run.
    while not group.wait(PLACEMENT_WAIT_LOG_S):
        log.warning("waiting %.0fs for a placement group of %d x %s: the Ray cluster's resources are in use",
                    time.monotonic() - started, num_actors, bundle)
    return group


def release_placement_group(group: PlacementGroup | None) -> None:
    """Give a placement group's resources back to the cluster (no-op for None)."""
    if group is not None:
        remove_placement_group(group)


def current_node() -> str:
    """The Ray node id of this process, or ``local`` when it is not part of a Ray cluster."""
    if not ray.is_initialized():
        return LOCAL_NODE
    return ray.get_runtime_context().get_node_id()


def check_address(workers: WorkersConfig) -> None:
    """Refuse a Ray address nothing answers on before any work (joining happens only once the parent is
    trained)."""
    if workers.executor == "ray" and not ray.is_initialized():
        address, field = resolve_address(workers.address)
        if address is not None:
            check_reachable(address, field)


def check_before_run(cfg: RunConfig) -> None:
    """What a new run can check before any work: where its run directory goes (``output_dir``, ``name``)
    and the Ray address."""
    check_output_dir(cfg.output_dir)
    check_run_name(cfg.name)
    check_output_folder(cfg.output_dir)
    check_address(cfg.workers)


def check_output_dir(output_dir: str) -> None:
    """Refuse a relative ``output_dir`` in a driver started by ``ray job submit``: its working directory
    is Ray's temporary copy of ``--working-dir``, deleted with the job, results included."""
    if os.environ.get(JOB_DRIVER_ENV) and not os.path.isabs(output_dir):
        raise ConfigError("output_dir", "an absolute path when the run is a Ray job (the job's working "
                                        "directory is a temporary copy that Ray deletes), e.g. "
                                        "output_dir=/shared/runs", output_dir)


HEAD_LOST_S = 10.0  # the head's GCS refusing connections this long: the cluster is gone
EXIT_CLUSTER_LOST = 3


class HeadWatch(Watch):
    """Ends the driver, with one line naming what was lost and the command that continues the run, once the
    Ray head (its GCS) has refused connections for ``lost_after`` seconds, or once the cluster has lacked
    the CPUs or GPUs its actors hold (``needs``) for ``short_after`` seconds.

    Without it a driver whose head went down repeats Ray's connection errors for a minute and then Ray
    aborts the process from C++; and an actor whose node is gone, with no room left for it elsewhere, is
    restarted by Ray only when room appears, so the search would wait forever on its tasks. Every
    checkpoint is written atomically, so ending the process at any moment loses at most the generation in
    flight, which ``resume`` evaluates again.
    """

    def __init__(self, gcs_address: str, resume_command: str, *, interval: float = 1.0,
                 lost_after: float = HEAD_LOST_S, needs: Mapping[str, float] | None = None,
                 short_after: float = 60.0):
        host, _, port = gcs_address.rpartition(":")
        self.address, self.target = gcs_address, (host, int(port))
        self.resume_command, self.interval, self.lost_after = resume_command, interval, lost_after
        self.needs = {k: v for k, v in (needs or {}).items() if v > 0}
        self.short_after = short_after
        super().__init__("evo-subens-head-watch")

    def watch(self) -> None:
        down_since = short_since = None
        while not self.stopped.wait(self.interval):
            try:
                socket.create_connection(self.target, timeout=self.interval).close()
                down_since = None
            except OSError:
                down_since = time.monotonic() if down_since is None else down_since
                if time.monotonic() - down_since >= self.lost_after and not self.stopped.is_set():
                    self._give_up(f"lost the Ray cluster at {self.address}: its head has refused connections "
                                  f"for {self.lost_after:g} s")
                continue
            try:
                short = self._shortfall()
            except Exception:  # noqa: BLE001 - Ray busy or reconnecting: the next check asks again
                continue
            short_since = None if not short else time.monotonic() if short_since is None else short_since
            if short and time.monotonic() - short_since >= self.short_after and not self.stopped.is_set():
                self._give_up(f"the Ray cluster at {self.address} has lost nodes: for {self.short_after:g} s it has "
                              f"had {short}, so Ray cannot place every actor again (fewer actors, "
                              f"workers.num_actors=N, fit what is left)")

    def _shortfall(self) -> str:
        """What the cluster lacks of ``needs`` (e.g. '2 of the 4 CPUs the actors hold'), or ''."""
        if not self.needs:
            return ""
        have = ray.cluster_resources()
        lacking = [f"{have.get(name, 0):g} of the {need:g} {name}s the actors hold"
                   for name, need in self.needs.items() if have.get(name, 0) < need]
        return " and ".join(lacking)

    def _give_up(self, what: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"evo-subens: error: {what}; the run is checkpointed, continue it with: "
                         f"{self.resume_command}\n")
        sys.stderr.flush()
        os._exit(EXIT_CLUSTER_LOST)  # Ray's threads would keep the process waiting on the dead cluster


def watch_head(run_dir: Path, workers: WorkersConfig, needs: Mapping[str, float]) -> HeadWatch | None:
    """A started :class:`HeadWatch` for a run evaluating on Ray whose actors hold ``needs`` (None for the
    in-process executor)."""
    if workers.executor != "ray" or not ray.is_initialized():
        return None
    command = f"evo-subens resume {run_dir}"
    if workers.address:
        command += " --address HOST:PORT (a new cluster's head) or workers.address=null (a Ray on this machine)"
    elif os.environ.get("RAY_ADDRESS"):
        command += " with RAY_ADDRESS set to a new cluster's head, or unset for a Ray on this machine"
    return HeadWatch(ray.get_runtime_context().gcs_address, command, needs=needs,
                     short_after=workers.lost_nodes_wait).start()
