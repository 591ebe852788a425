"""deploy/: the dashboard and alert rules use metrics the services really expose; promtool
accepts the rules and the config; a real Prometheus scrapes the three services."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from supersede.keys import Keys
from supersede.services.keda import backlog_query
from tests.support import APP_WORKFLOWS, CLI, REPO, System, eventually, exposed, listening

DEPLOY = REPO / "deploy"
SUFFIXES = ("_bucket", "_sum", "_count")
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
NO_PROMETHEUS = (
    "promtool/prometheus not installed (Debian package `prometheus`; .ci/run installs it)"
)


GLOBAL_GAUGES = (
    "supersede_admission_queued_runs",
    "supersede_admission_active_runs",
    "supersede_admission_stream_lag",
    "supersede_admission_workflow_unserved_seconds",
    "supersede_ingress_inbox_lag",
)


def names_in(text: str) -> set[str]:
    """The metric names `text` uses (a label named supersede_..., as supersede_namespace, is
    not one)."""
    found = set(re.findall(r"supersede_[a-z_]+", text)) - {"supersede_namespace"}
    out = set()
    for name in found:
        for suffix in SUFFIXES:
            if name.endswith(suffix) and name[: -len(suffix)] in exposed():
                name = name[: -len(suffix)]
        out.add(name)
    return out


def test_dashboard_and_alerts_use_only_exposed_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "supersede-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    # Every admission (ingress) process exports the same deployment-wide figures: they are
    # read with max, or two replicas would count twice (or draw a line each); or tested for
    # absence (a service down).
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    every = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    every += re.findall(r"expr: (.*)", alerts)
    for name in GLOBAL_GAUGES:
        uses = [e for e in every if name in e]
        assert uses, name
        for expr in uses:
            read = r"(?:max(?: by \(\w+\))? ?|absent)\((?:last_over_time\()?" + name
            assert re.search(read, expr), expr  # (last_over_time: across a failed scrape)
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    used = names_in(exprs) | names_in(alerts)
    assert used and used <= set(exposed()), used - set(exposed())
    # an aggregation by a label reads a metric that has it (the active runs, which have no
    # workflow label, were drawn "by workflow": one line, named as if it were one workflow's)
    from prometheus_client import REGISTRY

    labels = {}
    for collector, names in REGISTRY._collector_to_names.items():
        for name in names:  # (prometheus_client's metrics, and this project's loop metrics)
            labels[name] = getattr(collector, "_labelnames", getattr(collector, "labelnames", ()))
    grouped = re.findall(r"by \((\w+)\) \(\w*\(?(supersede_\w+)", " ".join(every))
    assert grouped
    for label, name in grouped:
        assert label in labels[name] or (label, name[-7:]) == ("le", "_bucket"), (label, name)


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMETHEUS)
def test_promtool_accepts_the_rules_and_the_config() -> None:
    # (test rules: each alert fires in its situation, a service down included, and stays
    # quiet while healthy: alerts_test.yml)
    for args in (
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        proc = subprocess.run([PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True)
        assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


class _Prometheus:
    """A real Prometheus scraping `targets` every second, from a scratch directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    async def start(self, targets: Iterable[int]) -> None:
        config = self.workdir / "prometheus.yml"
        listed = ", ".join(f'"127.0.0.1:{p}"' for p in targets)
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n  - job_name: supersede\n"
            f"    static_configs: [{{targets: [{listed}]}}]\n"
        )

        def start(port: int) -> subprocess.Popen[bytes]:
            assert PROMETHEUS is not None
            with self.log.open("ab") as log:
                return subprocess.Popen(
                    [PROMETHEUS, f"--config.file={config}",
                     f"--storage.tsdb.path={self.workdir}/data",
                     f"--web.listen-address=127.0.0.1:{port}"],
                    stdout=log, stderr=log,
                )  # fmt: skip

        self.proc, self.port = await listening(start, "/-/ready")

    def query(self, expr: str) -> list[dict[str, object]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return list(json.loads(resp.read())["data"]["result"])
        except OSError:
            return []

    async def value(self, expr: str) -> float:
        result = await asyncio.to_thread(self.query, expr)
        return float(result[0]["value"][1]) if result else 0.0

    async def reaches(self, wanted: dict[str, float], timeout: float) -> None:
        """Each query's value reaches its least; the values last seen and Prometheus's own
        log otherwise (a port taken, a scrape refused, a slow start: said, not guessed)."""
        seen: dict[str, float] = {}

        async def reached() -> bool:
            for expr, least in wanted.items():
                seen[expr] = await self.value(expr)
                if seen[expr] < least:
                    return False
            return True

        try:
            await eventually(reached, timeout=timeout)
        except AssertionError:
            targets = await asyncio.to_thread(self.targets)
            tail = self.log.read_text(errors="replace")[-3000:]
            raise AssertionError(
                f"saw {seen}, wanted {wanted}; targets {targets}; prometheus:\n{tail}"
            ) from None

    def targets(self) -> list[tuple[object, ...]]:
        """Each target's health, last error and last scrape's duration."""
        url = f"http://127.0.0.1:{self.port}/api/v1/targets"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                active = json.loads(resp.read())["data"]["activeTargets"]
        except OSError as exc:
            return [("unreachable", str(exc))]
        keys = ("scrapeUrl", "health", "lastError", "lastScrapeDuration")
        return [tuple(t.get(k) for k in keys) for t in active]

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.skipif(PROMETHEUS is None, reason=NO_PROMETHEUS)
async def test_a_real_prometheus_scrapes_the_three_services(
    redis: Redis, redis_url: str, keys: Keys
) -> None:
    system = System(redis_url, keys)
    workdir = Path(tempfile.mkdtemp(prefix="supersede-prom-"))
    prom = _Prometheus(workdir)
    try:
        ports: dict[str, int] = {}
        _, ports["admission"] = await system.serving("admission")
        _, ports["executor"] = await system.serving("executor", "tests.support.apps.demo")

        async def registered() -> bool:
            return int(await redis.hlen(keys.workflows_hash)) == APP_WORKFLOWS

        await eventually(registered, timeout=30)
        _, ports["ingress"] = await system.serving("ingress")
        await prom.start(ports.values())
        for i in range(20):
            await redis.xadd(keys.events_stream, {"name": "work.item", "data": f'{{"i": {i}}}'})
        wanted = {
            'count(up{job="supersede"} == 1)': 3.0,
            'sum(supersede_executor_runs_finished_total{outcome="succeeded"})': 20.0,
            "sum(supersede_ingress_runs_requested_total)": 20.0,
            "sum(supersede_admission_requests_total)": 20.0,
        }
        await prom.reaches(wanted, timeout=60)
        # The query `supersede keda` gives a pool parses and finds the pool's backlog series.
        from supersede.services.keda import backlog_query

        keda_query = backlog_query(["work", "chat-reply"])
        await eventually(lambda: asyncio.to_thread(lambda: bool(prom.query(keda_query))), 30)
        # The names the dashboard and the alerts use, against what the three services expose
        # after this short end-to-end run (their own /metrics, exposition format parsed).
        from tests.support import scrape

        live: set[str] = set()
        for port in ports.values():
            body = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
            live |= set(re.findall(r"^# TYPE (supersede_\S+) \S+$", body, re.MULTILINE))
        dashboard = json.loads((DEPLOY / "grafana" / "supersede-dashboard.json").read_text())
        exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
        used = names_in(exprs) | names_in((DEPLOY / "prometheus" / "alerts.yml").read_text())
        assert used <= live, used - live
    finally:
        prom.stop()
        system.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_compose_and_manifests_reference_what_the_services_really_use() -> None:
    from supersede.services.cli import build_parser

    parser = build_parser()
    defaults = {
        name: parser.parse_args([name, *(["m"] if name == "executor" else [])]).metrics_port
        for name in ("ingress", "admission", "executor")
    }
    compose = (DEPLOY / "docker-compose.yml").read_text()
    k8s = (DEPLOY / "k8s" / "deployments.yaml").read_text()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for text in (compose, k8s):
        assert "image: supersede:latest" in text
        for env in ("SUPERSEDE_REDIS_URL", "SUPERSEDE_NAMESPACE", "SUPERSEDE_SHARDS"):
            assert env in text
        for service, port in defaults.items():
            assert f'"{service}"' in text and str(port) in text
    for port in defaults.values():
        assert (
            str(port) in dockerfile
            and str(port) in (DEPLOY / "prometheus" / "prometheus.yml").read_text()
        )
    assert 'ENTRYPOINT ["supersede"]' in dockerfile and "USER supersede" in dockerfile
    # the dashboard and OTEL_* export work in the image (it had neither extra: `supersede ui`
    # and a service with OTEL_TRACES_EXPORTER set refused to start, a newcomer probe)
    assert '--wheel-dir /wheels ".[ui,tracing]"' in dockerfile
    assert "/healthz" in k8s and "/readyz" in k8s
    # The KEDA file is `supersede keda` for the demo pool: one trigger, the pool's workflows'
    # unclaimed backlog summed (per-stream triggers would count a spread backlog by its part).
    keda = (DEPLOY / "k8s" / "keda-executor.yaml").read_text()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    generated = subprocess.run(
        [*CLI, "keda", "supersede.services.demo"], env=clean, capture_output=True, check=True
    ).stdout.decode()
    assert keda == generated
    from supersede.services import demo

    query = backlog_query([demo.autosave.id, demo.chat.id, demo.reindex.id])
    assert query in keda and "supersede_admission_assignment_backlog" in exposed()


def test_keda_redis_form_signs_in_as_the_keda_user() -> None:
    """`supersede keda --source redis`: a trigger per shard and workflow on the executor group's
    lag, each authenticated through a TriggerAuthentication that reads the keda user's
    credentials from a Secret; the file in deploy/k8s/alternatives is that output."""
    import yaml

    clean = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    cmd = [*CLI, "keda", "supersede.services.demo", "--source", "redis"]
    generated = subprocess.run(cmd, env=clean, capture_output=True, check=True).stdout.decode()
    assert (DEPLOY / "k8s" / "alternatives" / "keda-executor-redis.yaml").read_text() == generated
    secret, auth, scaled = list(yaml.safe_load_all(generated))
    assert secret["kind"] == "Secret" and secret["stringData"]["username"] == "supersede-keda"
    assert auth["kind"] == "TriggerAuthentication"
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    name = secret["metadata"]["name"]
    assert refs == {"username": (name, "username"), "password": (name, "password")}
    triggers = scaled["spec"]["triggers"]
    assert len(triggers) == 16 * 3  # shards x the demo pool's workflows
    for t in triggers:
        assert t["type"] == "redis-streams" and t["authenticationRef"] == {"name": name}
        assert (
            t["metadata"]["consumerGroup"] == "executors"
            and ":assignments:" in t["metadata"]["stream"]
        )
        # the activation threshold KEDA's docs ask for beside lagCount
        assert t["metadata"]["activationLagCount"] == "0"
        assert "unsafeSsl" not in t["metadata"]
    # What KEDA makes of it: each trigger proposes ceil(its stream's lag / lagCount) replicas
    # and the largest wins. A backlog of 16 x --lag (50) runs of one workflow, spread over its
    # 16 shards, asks for about 16 replicas (with lagCount 50 on each stream it proposed 1).
    tag = triggers[0]["metadata"]["stream"].rsplit(":", 1)[1]  # (one workflow's streams)
    one = [t for t in triggers if t["metadata"]["stream"].endswith(f":{tag}")]
    assert len(one) == 16
    proposals = [math.ceil(50 / int(t["metadata"]["lagCount"])) for t in one]
    assert 16 <= max(proposals) <= 20, proposals

    # Over TLS (a rediss:// URL), KEDA is told to use TLS, with the URL's CA and client
    # certificate as Secret entries, and to skip the checks only where the URL does.
    url = (
        "rediss://supersede-keda:pw@redis:6380/0?ssl_ca_certs=/etc/tls/ca.pem"
        "&ssl_certfile=/etc/tls/client.pem&ssl_keyfile=/etc/tls/client.key"
    )
    for query, unsafe in (("", False), ("&ssl_cert_reqs=none", True)):
        env = {**clean, "SUPERSEDE_REDIS_URL": url + query}
        out = subprocess.run(cmd, env=env, capture_output=True, check=True).stdout.decode()
        secret, auth, scaled = list(yaml.safe_load_all(out))
        assert secret["stringData"]["tls"] == "enable"
        assert {k: v for k, v in secret["stringData"].items() if k in ("ca", "cert", "key")} == {
            "ca": "CHANGE-ME",
            "cert": "CHANGE-ME",
            "key": "CHANGE-ME",
        }
        assert "/etc/tls/client.key" in out  # (named in a comment beside its entry)
        params = {r["parameter"] for r in auth["spec"]["secretTargetRef"]}
        assert params == {"username", "password", "tls", "ca", "cert", "key"}
        for t in scaled["spec"]["triggers"]:
            assert ("unsafeSsl" in t["metadata"]) is unsafe
            assert "enableTLS" not in t["metadata"]  # (KEDA refuses it beside the `tls` param)


def test_compose_manifests_and_prometheus_files_parse() -> None:
    import yaml

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {
        "redis",
        "acl",
        "ingress",
        "admission",
        "executor",
        "prometheus",
        "grafana",
    }
    redis = compose["services"]["redis"]
    assert "--appendonly yes" in " ".join(redis["command"])
    # the server steps down to the image's redis user (a `sh -c` command skips the image's
    # entrypoint, which does), and what needs it waits until it answers PING, not until its
    # process started (still loading an AOF, it answers LOADING: `acl --apply` failed)
    assert "exec gosu redis redis-server" in redis["command"][-1]
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    for service in ("acl", "ingress", "admission", "executor"):
        assert compose["services"][service]["depends_on"]["redis"] == {
            "condition": "service_healthy"
        }
    assert compose["services"]["executor"]["deploy"]["replicas"] == 3
    for service in ("ingress", "admission", "executor"):
        assert compose["services"][service]["image"] == "supersede:latest"
        assert compose["services"][service]["environment"]["SUPERSEDE_REDIS_URL"].startswith(
            "redis://"
        )
    kinds = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.append(doc["kind"])
            if doc["kind"] == "Deployment":
                [container] = doc["spec"]["template"]["spec"]["containers"]
                assert container["image"] == "supersede:latest"
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert container["resources"]["requests"]["cpu"]
            if doc["kind"] == "ScaledObject":
                [trigger] = doc["spec"]["triggers"]
                assert (
                    trigger["type"] == "prometheus" and "workflow=~" in trigger["metadata"]["query"]
                )
    assert kinds.count("Deployment") == 3 and "PodMonitor" in kinds and "ScaledObject" in kinds
    for path in (DEPLOY / "grafana" / "provisioning").rglob("*.yml"):
        assert yaml.safe_load(path.read_text())["apiVersion"] == 1
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert len(rules["groups"][0]["rules"]) >= 6


def test_deploy_files_are_hardened() -> None:
    """Issue 14, item 5: Redis needs a password and is not published, Grafana has no anonymous
    Admin, published ports stay on loopback; the pods run as non-root with a read-only root
    filesystem, no privilege escalation, no capabilities and the RuntimeDefault seccomp
    profile, read the Redis URL from a Secret, and a NetworkPolicy limits their traffic."""
    import yaml

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "ports" not in redis and redis["environment"]["REDIS_PASSWORD"].startswith(
        "${REDIS_PASSWORD:?"
    )
    # users (the admin's password and the role users) in an ACL file: they survive a restart
    assert "--aclfile /data/users.acl" in command
    assert 'echo "user default on >$$REDIS_PASSWORD ~* &* +@all" > /data/users.acl' in command
    # each service connects as its own ACL user, created first by the one-shot `acl` service
    acl = services["acl"]
    assert acl["command"][:2] == ["acl", "--apply"]
    assert acl["environment"]["SUPERSEDE_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?")
    for name in ("ingress", "admission", "executor"):
        env = services[name]["environment"]
        secret = f"SUPERSEDE_ACL_PASSWORD_{name.upper()}"
        assert env["SUPERSEDE_REDIS_URL"].startswith(f"redis://supersede-{name}:${{{secret}:?")
        assert acl["environment"][secret].startswith(f"${{{secret}:?")
        assert services[name]["depends_on"]["acl"] == {
            "condition": "service_completed_successfully"
        }
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    for service in services.values():
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", []))

    docs = [
        doc
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 3
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            url = next(e for e in c["env"] if e["name"] == "SUPERSEDE_REDIS_URL")
            role = d["metadata"]["labels"]["app.kubernetes.io/component"]
            assert url["valueFrom"]["secretKeyRef"] == {"name": "supersede-redis", "key": role}
    [secret] = [
        d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "supersede-redis"
    ]
    # the users they sign in as, made by a Job as compose's `acl` service makes them (its
    # passwords are those of the URLs above; a docs probe found no step that made them)
    [job] = [d for d in docs if d["kind"] == "Job"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["acl", "--apply"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert env["SUPERSEDE_REDIS_URL"] == {"name": "supersede-redis-admin", "key": "url"}
    for role in ("ingress", "admission", "executor"):
        assert f"--role {role}" in " ".join(container["args"])
        assert env[f"SUPERSEDE_ACL_PASSWORD_{role.upper()}"]["key"] == role
    for role in ("ingress", "admission", "executor"):
        assert secret["stringData"][role].startswith(f"redis://supersede-{role}:CHANGE-ME@")
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "supersede"}
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]} == {6379, 53}
    # Only Prometheus may scrape: a namespace selector and a pod selector in one peer (as two
    # peers, which are OR'd, any pod of the monitoring namespace got in: a newcomer probe)
    peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    assert peers == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }]  # fmt: skip
