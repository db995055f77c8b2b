#!/usr/bin/python3
"""Deployment files, validated as far as this machine allows (no Docker
engine, no cluster): YAML parses, every image path the Dockerfile copies
exists, every binary and flag the compose file and manifests use exists."""
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


def known_flags(binary):
    out = subprocess.run([os.path.join(BIN, binary), "--helpfull"], capture_output=True, text=True).stdout
    return set(re.findall(r"--([a-z_0-9]+) \(", out))


def containers(doc):
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", [])


class DeployTest(unittest.TestCase):
    def check_command(self, command, args, where):
        binary = os.path.basename(command[0]) if command else None
        if binary not in ("ape-encoder", "ape-decoder"):
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

    def test_kubernetes_manifests(self):
        checked = 0
        for name in sorted(os.listdir(os.path.join(DEPLOY, "k8s"))):
            with open(os.path.join(DEPLOY, "k8s", name)) as f:
                docs = [d for d in yaml.safe_load_all(f) if d]
            self.assertTrue(docs, name)
            for d in docs:
                self.assertIn(d["kind"], ("Deployment", "Service"), name)
                for c in containers(d):
                    checked += self.check_command(c.get("command", []), c.get("args", []), name)
                    for probe in ("readinessProbe", "livenessProbe"):
                        if "grpc" in c.get(probe, {}):
                            ports = [p["containerPort"] for p in c["ports"]]
                            self.assertIn(c[probe]["grpc"]["port"], ports, f"{name}: {probe} port")
                    self.assertIn("requests", c.get("resources", {}), f"{name}: resource requests")
                if d["kind"] == "Service" and d["metadata"]["name"] == "apeserve-encoder":
                    self.assertEqual(d["spec"].get("clusterIP"), "None", "encoder service must be headless")
        self.assertEqual(checked, 2)

    def test_compose(self):
        with open(os.path.join(DEPLOY, "compose.yaml")) as f:
            c = yaml.safe_load(f)
        checked = 0
        for name, svc in c["services"].items():
            checked += self.check_command(svc.get("entrypoint", []), svc.get("command", []), f"compose {name}")
        self.assertEqual(checked, 2)

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


if __name__ == "__main__":
    unittest.main(verbosity=2)
