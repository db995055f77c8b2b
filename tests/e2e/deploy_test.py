#!/usr/bin/python3
"""Deployment files, validated as far as this machine allows (no Docker
engine, no cluster): YAML parses, every image path the Dockerfile copies
exists, every binary and flag the compose file and manifests use exists
(servers and the apectl health probes), no password is ever an argument
(it comes from a Secret, through the environment or a file), Redis requires
it, only encoder and decoder pods may reach Redis (NetworkPolicy), and
gRPC is served over TLS from a Secret-mounted certificate."""
import os
import re
import subprocess
import sys
import unittest

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
from apeserve_launcher import default_bin_dir  # noqa: E402

BIN = default_bin_dir()  # $APE_BIN_DIR, else build/bin
DEPLOY = os.path.join(ROOT, "deploy")
SERVERS = ("ape-encoder", "ape-decoder")
_flags = {}


def known_flags(binary):
    if binary not in _flags:
        out = subprocess.run([os.path.join(BIN, binary), "--helpfull"], capture_output=True, text=True).stdout
        _flags[binary] = set(re.findall(r"--([a-z_0-9]+) \(", out))
    return _flags[binary]


def pod_spec(doc):
    return doc.get("spec", {}).get("template", {}).get("spec", {})


def containers(doc):
    return pod_spec(doc).get("containers", [])


def template_labels(doc):
    return doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})


def load_manifests():
    """{file name: [documents]} of deploy/k8s."""
    out = {}
    for name in sorted(os.listdir(os.path.join(DEPLOY, "k8s"))):
        with open(os.path.join(DEPLOY, "k8s", name)) as f:
            out[name] = [d for d in yaml.safe_load_all(f) if d]
    return out


class DeployTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.manifests = load_manifests()
        cls.docs = [d for docs in cls.manifests.values() for d in docs]
        cls.deployments = {d["metadata"]["name"]: d for d in cls.docs if d["kind"] == "Deployment"}
        with open(os.path.join(DEPLOY, "compose.yaml")) as f:
            cls.compose = yaml.safe_load(f)

    def check_command(self, command, args, where):
        binary = os.path.basename(command[0]) if command else None
        if binary not in SERVERS:
            return 0
        flags = known_flags(binary)
        self.assertTrue(flags, f"{binary} --helpfull listed no flags")
        for a in args:
            m = re.match(r"--([a-z_0-9]+)=", a)
            self.assertTrue(m, f"{where}: argument {a!r} is not --flag=value")
            self.assertIn(m.group(1), flags, f"{where}: {binary} has no flag --{m.group(1)}")
            if m.group(1) == "model":
                self.assertTrue(a.split("=", 1)[1].startswith("/models/"), a)
        return 1

    def check_apectl_probe(self, command, ports, where):
        """An exec probe running `apectl health [flags] ADDRESS`: flags exist
        (apectl takes dashes for underscores) and ADDRESS is the container's port."""
        self.assertEqual(os.path.basename(command[0]), "apectl", where)
        self.assertEqual(command[1], "health", where)
        flags = known_flags("apectl")
        positional = []
        for a in command[2:]:
            m = re.match(r"--([a-z_0-9-]+)=", a)
            if m:
                self.assertIn(m.group(1).replace("-", "_"), flags, f"{where}: apectl has no flag --{m.group(1)}")
            else:
                positional.append(a)
        self.assertEqual(len(positional), 1, f"{where}: apectl health takes one address")
        self.assertIn(int(positional[0].rsplit(":", 1)[1]), ports, f"{where}: probe port")

    def test_kubernetes_manifests(self):
        checked = 0
        for name, docs in self.manifests.items():
            self.assertTrue(docs, name)
            for d in docs:
                self.assertIn(d["kind"], ("Deployment", "Service", "Secret", "NetworkPolicy"), name)
                for c in containers(d):
                    checked += self.check_command(c.get("command", []), c.get("args", []), name)
                    ports = [p["containerPort"] for p in c["ports"]]
                    for probe in ("readinessProbe", "livenessProbe"):
                        if "grpc" in c.get(probe, {}):
                            self.assertIn(c[probe]["grpc"]["port"], ports, f"{name}: {probe} port")
                        if "exec" in c.get(probe, {}):
                            self.check_apectl_probe(c[probe]["exec"]["command"], ports, f"{name}: {probe}")
                    self.assertIn("requests", c.get("resources", {}), f"{name}: resource requests")
                if d["kind"] == "Service" and d["metadata"]["name"] == "apeserve-encoder":
                    self.assertEqual(d["spec"].get("clusterIP"), "None", "encoder service must be headless")
        self.assertEqual(checked, 2)

    def test_servers_are_scraped_for_metrics(self):
        """Each server pod: Prometheus annotations naming a container port
        that --metrics_listen serves, at /metrics."""
        for d, c in self.server_containers():
            where = d["metadata"]["name"]
            ann = d["spec"]["template"]["metadata"].get("annotations", {})
            self.assertEqual(ann.get("prometheus.io/scrape"), "true", where)
            self.assertEqual(ann.get("prometheus.io/path"), "/metrics", where)
            listen = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--metrics_listen=")]
            self.assertEqual(len(listen), 1, where)
            port = int(ann["prometheus.io/port"])
            self.assertEqual(int(listen[0].rsplit(":", 1)[1]), port, where)
            self.assertIn(port, [p["containerPort"] for p in c["ports"]], where)

    def server_containers(self):
        out = []
        for d in self.deployments.values():
            out += [(d, c) for c in containers(d) if os.path.basename((c.get("command") or [""])[0]) in SERVERS]
        self.assertEqual(len(out), 2)
        return out

    def redis_deployment(self):
        found = [d for d in self.deployments.values()
                 if any(c["image"].startswith("redis:") for c in containers(d))]
        self.assertEqual(len(found), 1, "one Redis Deployment")
        return found[0]

    def secret_ref(self, container, env_name):
        env = {e["name"]: e for e in container.get("env", [])}
        self.assertIn(env_name, env, f"{container['name']}: no ${env_name}")
        self.assertNotIn("value", env[env_name], f"{container['name']}: ${env_name} is a literal")
        ref = env[env_name]["valueFrom"]["secretKeyRef"]
        return ref["name"], ref["key"]

    def test_kubernetes_redis_password_from_secret_never_in_args(self):
        secrets = {d["metadata"]["name"]: d for d in self.docs if d["kind"] == "Secret"}
        redis = containers(self.redis_deployment())[0]
        ref = self.secret_ref(redis, "REDIS_PASSWORD")
        self.assertIn(ref[0], secrets, "the Redis password's Secret is defined")
        self.assertIn(ref[1], {**secrets[ref[0]].get("stringData", {}), **secrets[ref[0]].get("data", {})})
        script = " ".join(redis.get("command", []) + redis.get("args", []))
        self.assertRegex(script, r"requirepass \$REDIS_PASSWORD\b", "Redis requires the Secret's password")
        self.assertIn('""|change-me)', script, "Redis refuses the placeholder and an empty password")
        for _, c in self.server_containers():
            self.assertEqual(self.secret_ref(c, "APESERVE_REDIS_PASSWORD"), ref, c["name"])
        for d in self.docs:
            for c in containers(d):
                for a in c.get("command", []) + c.get("args", []):
                    self.assertNotRegex(a, r"redis://[^/\s]*@", f"{c['name']}: credentials in a Redis URI")
                    self.assertNotRegex(a, r"requirepass\s+[^$\s]", f"{c['name']}: a literal requirepass")
                    self.assertNotRegex(a, r"--redis_password(?!_file)", f"{c['name']}: a password flag")
                for e in c.get("env", []):
                    if re.search("PASSWORD|SECRET|TOKEN", e["name"]):
                        self.assertIn("secretKeyRef", e.get("valueFrom", {}), f"{c['name']}: ${e['name']}")

    def test_kubernetes_network_policy_admits_only_encoders_and_decoders_to_redis(self):
        policies = [d for d in self.docs if d["kind"] == "NetworkPolicy"]
        self.assertTrue(policies, "no NetworkPolicy")
        redis = self.redis_deployment()
        redis_labels = template_labels(redis)
        redis_ports = {p["containerPort"] for c in containers(redis) for p in c["ports"]}
        guarding = [p for p in policies
                    if p["spec"]["podSelector"].get("matchLabels", {}).items() <= redis_labels.items()
                    and p["spec"]["podSelector"].get("matchLabels")]
        self.assertEqual(len(guarding), 1, "one NetworkPolicy selects the Redis pods")
        spec = guarding[0]["spec"]
        self.assertIn("Ingress", spec["policyTypes"])
        allowed = set()
        for rule in spec["ingress"]:
            self.assertTrue(rule.get("from"), "an ingress rule without 'from' admits everyone")
            for peer in rule["from"]:
                self.assertEqual(set(peer), {"podSelector"}, f"peer {peer} is more than a pod selector")
                self.assertNotIn("matchExpressions", peer["podSelector"])
                allowed.add(tuple(sorted(peer["podSelector"]["matchLabels"].items())))
            self.assertTrue(rule.get("ports"), "an ingress rule without ports admits every port")
            self.assertEqual({p["port"] for p in rule["ports"]}, redis_ports)
        servers = {tuple(sorted(template_labels(d).items())) for d, _ in self.server_containers()}
        self.assertEqual(allowed, servers, "exactly the encoder and decoder pods reach Redis")

    def test_kubernetes_grpc_tls_from_secret(self):
        for d, c in self.server_containers():
            args = dict(a[2:].split("=", 1) for a in c["args"])
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            secret_mounts = {mounts[v["name"]] for v in pod_spec(d).get("volumes", [])
                             if "secret" in v and v["name"] in mounts}
            flags = ["tls_cert", "tls_key"] + (["encoder_tls_ca"] if "encoder" in args else [])
            for flag in flags:
                self.assertIn(flag, args, f"{c['name']}: --{flag}")
                self.assertTrue(any(args[flag].startswith(m + "/") for m in secret_mounts),
                                f"{c['name']}: --{flag}={args[flag]} is not in a Secret volume")
            for probe in ("readinessProbe", "livenessProbe"):
                self.assertIn("exec", c[probe], f"{c['name']}: the kubelet's grpc probe cannot speak TLS")

    def test_compose(self):
        c = self.compose
        checked = 0
        for name, svc in c["services"].items():
            checked += self.check_command(svc.get("entrypoint", []), svc.get("command", []), f"compose {name}")
        self.assertEqual(checked, 2)

    def test_compose_redis_password_from_secret_file(self):
        c = self.compose
        defined = set(c.get("secrets", {}))
        servers = 0
        for name, svc in c["services"].items():
            cmd = svc.get("command", [])
            text = " ".join(cmd if isinstance(cmd, list) else [cmd])
            self.assertNotRegex(text, r"redis://[^/\s]*@", f"compose {name}: credentials in a Redis URI")
            self.assertNotRegex(text, r"requirepass\s+[^$\s]", f"compose {name}: a literal requirepass")
            for e in svc.get("environment", []) or []:
                self.assertNotRegex(str(e), "PASSWORD", f"compose {name}: a password in the environment block")
            if os.path.basename((svc.get("entrypoint") or [""])[0]) in SERVERS:
                servers += 1
                files = [a.split("=", 1)[1] for a in cmd if a.startswith("--redis_password_file=")]
                self.assertEqual(len(files), 1, f"compose {name}: --redis_password_file")
                secret = files[0].removeprefix("/run/secrets/")
                self.assertIn(secret, svc.get("secrets", []), f"compose {name}: mounts its secret")
                self.assertIn(secret, defined)
        self.assertEqual(servers, 2)
        redis = c["services"]["redis"]
        self.assertIn("requirepass $$(cat /run/secrets/", " ".join(redis["command"]))
        self.assertNotIn("ports", redis, "Redis publishes no port")

    def test_dockerfile_paths_exist(self):
        with open(os.path.join(DEPLOY, "Dockerfile")) as f:
            text = f.read()
        copies = re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
        self.assertTrue(copies)
        for line in copies:
            for src in line.split()[:-1]:
                self.assertTrue(os.path.exists(os.path.join(ROOT, src)), f"Dockerfile copies missing {src}")
        for b in re.findall(r"/src/build/bin/([a-z-]+)", text):
            self.assertTrue(os.path.exists(os.path.join(BIN, b)), f"Dockerfile expects binary {b}")
        self.assertIn("FROM debian:bookworm AS build", text)
        self.assertIn("/usr/local/bin/", text)
        self.assertRegex(text, r"COPY --from=build .*/apectl", "the probes run apectl")


if __name__ == "__main__":
    unittest.main(verbosity=2)
