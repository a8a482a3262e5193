"""Checks deploy/kubernetes offline: every core resource against the
Kubernetes schemas (kubernetes-validate, strict), the cert-manager
Certificate's required fields, and the invariants tandem needs of the
Deployment. Prints one line per check; exits 1 on the first failure."""

import base64
import pathlib
import subprocess
import sys

import yaml

root = pathlib.Path(sys.argv[1])
k8s = root / "deploy/kubernetes"
core = sorted(p for p in k8s.glob("*.yaml") if p.name != "certificate.yaml")


def fail(msg):
    print(f"FAIL {msg}")
    sys.exit(1)


out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, core)], capture_output=True, text=True)
print(out.stdout + out.stderr)
if out.returncode != 0 or out.stdout.count("passed") != len(core):
    fail("kubernetes-validate refused a manifest")

cert = yaml.safe_load((k8s / "certificate.yaml").read_text())
spec = cert.get("spec", {})
if cert.get("apiVersion") != "cert-manager.io/v1" or cert.get("kind") != "Certificate":
    fail("certificate.yaml is not a cert-manager.io/v1 Certificate")
for field in ("secretName", "issuerRef", "dnsNames"):
    if not spec.get(field):
        fail(f"the Certificate has no {field}")
if not spec["issuerRef"].get("name"):
    fail("the Certificate's issuerRef has no name")

dep = yaml.safe_load((k8s / "deployment.yaml").read_text())
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
env = {e["name"]: e.get("value") for e in c["env"]}
if pod["terminationGracePeriodSeconds"] <= int(env.get("GRACEFUL_TIMEOUT", "30")):
    fail("terminationGracePeriodSeconds must exceed GRACEFUL_TIMEOUT")
if not pod["securityContext"].get("runAsNonRoot") or pod["securityContext"].get("runAsUser") != 10001:
    fail("the pod must run as the image's uid 10001")
if not c["securityContext"].get("readOnlyRootFilesystem"):
    fail("the root filesystem must be read-only")
if c["readinessProbe"]["httpGet"]["path"] != "/v2/health/ready" or c["livenessProbe"]["httpGet"]["path"] != "/v2/health/live":
    fail("probes must be /v2/health/ready and /v2/health/live")
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
volumes = {v["name"]: v for v in pod["volumes"]}
if "emptyDir" not in volumes["cache"] or not env["MODEL_CACHE_DIR"].startswith(mounts["cache"] + "/"):
    fail("MODEL_CACHE_DIR must be a directory inside the cache emptyDir (whose root is world-writable)")
if volumes["tls"]["secret"]["secretName"] != spec["secretName"] or not env["SSL_CERTIFICATE"].startswith(mounts["tls"] + "/"):
    fail("SSL_CERTIFICATE must be in the mounted cert-manager secret")
if dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] != 0:
    fail("a rolling update must never take a ready pod away first")

cm = yaml.safe_load((k8s / "configmap-models.yaml").read_text())
digits = root / "models/digits"
if cm["data"]["digits.config.pbtxt"] != (digits / "config.pbtxt").read_text():
    fail("the ConfigMap's config.pbtxt differs from models/digits")
if base64.b64decode(cm["binaryData"]["digits.model.onnx"]) != (digits / "1/model.onnx").read_bytes():
    fail("the ConfigMap's model.onnx differs from models/digits")
print("ok: every manifest checked")
