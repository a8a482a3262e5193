"""Checks deploy/kubernetes offline: builds every overlay with kustomize
(`kubectl kustomize`), alone and with the monitoring component; validates
every core resource against the Kubernetes schemas (kubernetes-validate,
strict) and the custom resources (cert-manager Certificate, Prometheus
Operator ServiceMonitor and PrometheusRule) for what they need; checks that
the objects fit each other and tandem (selectors, port names, probes, drain
time, the certificate's secret and path, the autoscaler's target); and runs
`tandem check` on each Deployment's environment, so tandem itself accepts
what the manifests set. Prints one line per check; exits 1 on the first
failure.

usage: check_kubernetes.py ROOT TANDEM_BINARY"""

import base64
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import yaml

root = pathlib.Path(sys.argv[1])
tandem = sys.argv[2]
k8s = root / "deploy/kubernetes"
OVERLAYS = ["plain", "cert-manager", "acme"]
CUSTOM = {"Certificate", "ServiceMonitor", "PrometheusRule"}


def fail(msg):
    print(f"FAIL {msg}")
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def build(overlay, components):
    """The overlay's objects as kustomize renders them, with `components` (names under components/)."""
    target = k8s / "overlays" / overlay
    with tempfile.TemporaryDirectory() as tmp:
        if components:
            # kustomize takes only relative paths to other folders.
            rel = lambda p: os.path.relpath(p, tmp)
            kustomization = {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(target)],
                "components": [rel(k8s / "components" / c) for c in components],
            }
            pathlib.Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
            target = tmp
        out = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True)
    check(out.returncode == 0, f"kustomize {overlay}: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    check(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def validate_core(docs, what):
    core = [d for d in docs if d["kind"] not in CUSTOM]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, d in enumerate(core):
            f = pathlib.Path(tmp, f"{i:02}-{d['kind']}.yaml")
            f.write_text(yaml.safe_dump(d))
            files.append(str(f))
        out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *files], capture_output=True, text=True)
    if out.returncode != 0 or out.stdout.count("passed") != len(core):
        print(out.stdout + out.stderr)
        fail(f"{what}: kubernetes-validate refused a manifest")
    print(f"ok: {what}: {len(core)} core objects validate ({', '.join(sorted({d['kind'] for d in core}))})")


def check_deployment(docs, overlay):
    dep = one(docs, "Deployment", "tandem")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    check(selects(dep["spec"]["selector"], pod_labels), "the Deployment's selector does not select its pods")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    port_names = {p["name"] for p in c["ports"]}
    check(pod["terminationGracePeriodSeconds"] > int(env.get("GRACEFUL_TIMEOUT", "30")), "terminationGracePeriodSeconds must exceed GRACEFUL_TIMEOUT")
    check(pod["securityContext"].get("runAsNonRoot") and pod["securityContext"].get("runAsUser") == 10001, "the pod must run as the image's uid 10001")
    check(c["securityContext"].get("readOnlyRootFilesystem"), "the root filesystem must be read-only")
    check(c["securityContext"]["capabilities"]["drop"] == ["ALL"], "every capability must be dropped")
    check(c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready" and c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live", "probes must be /v2/health/ready and /v2/health/live")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check(c[probe]["httpGet"]["port"] in port_names, f"{probe} names a port the container does not have")
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    check(set(mounts) <= set(volumes), "a volumeMount names no volume")
    cache = volumes["cache"]
    check(("emptyDir" in cache) != ("persistentVolumeClaim" in cache), "the cache volume must be one emptyDir or one claim")
    metrics_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
    check(env.get("METRICS_PORT") == str(metrics_port) and env.get("METRICS_PUBLIC") == "false", "metrics on the metrics port only")
    check(env["MODEL_CACHE_DIR"].startswith(mounts["cache"] + "/"), "MODEL_CACHE_DIR must be a directory inside the cache volume (whose root is group- or world-writable)")
    spread = pod.get("topologySpreadConstraints", [])
    keys = {t["topologyKey"] for t in spread}
    check({"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys, "pods must spread over zones and nodes")
    check(all(selects(t["labelSelector"], pod_labels) for t in spread), "a topology spread constraint does not select the pods")
    check(all(t["whenUnsatisfiable"] == "ScheduleAnyway" for t in spread), "spreading must never leave a pod unscheduled")
    if overlay == "acme":
        check(env["SSL_CERTIFICATE"] == "ACME" and env.get("ACME_DOMAINS") and env.get("ACME_EMAIL"), "the ACME overlay needs SSL_CERTIFICATE=ACME, ACME_DOMAINS and ACME_EMAIL")
        check(dep["spec"].get("replicas") == 1 and dep["spec"]["strategy"]["type"] == "Recreate", "one ACME pod, replaced (not rolled) on its ReadWriteOnce cache")
        claim = one(docs, "PersistentVolumeClaim", cache["persistentVolumeClaim"]["claimName"])
        check(claim["spec"]["accessModes"] == ["ReadWriteOnce"], "the ACME cache claim")
    else:
        check("emptyDir" in cache, "the cache is an emptyDir")
        check(dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, "a rolling update must never take a ready pod away first")
    if overlay == "plain":
        check(env["SSL_CERTIFICATE"] == "GENERATE", "the plain overlay generates its certificate")
    if overlay == "cert-manager":
        cert = one(docs, "Certificate", "tandem")
        spec = cert["spec"]
        check(cert["apiVersion"] == "cert-manager.io/v1", "the Certificate is cert-manager.io/v1")
        for field in ("secretName", "issuerRef", "dnsNames"):
            check(spec.get(field), f"the Certificate has no {field}")
        check(spec["issuerRef"].get("name"), "the Certificate's issuerRef has no name")
        check(volumes["tls"]["secret"]["secretName"] == spec["secretName"], "the mounted secret is not the Certificate's")
        check(env["SSL_CERTIFICATE"] == mounts["tls"] + "/tls.crt", "SSL_CERTIFICATE must be tls.crt in the mounted cert-manager secret")
    return dep, pod_labels, port_names, env


def check_around(docs, dep, pod_labels, port_names, overlay, components):
    svc = one(docs, "Service", "tandem")
    check(selects({"matchLabels": svc["spec"]["selector"]}, pod_labels), "the Service does not select the pods")
    check({p["targetPort"] for p in svc["spec"]["ports"]} <= port_names, "a Service port targets a port the container does not have")
    pdb = one(docs, "PodDisruptionBudget", "tandem")
    check(selects(pdb["spec"]["selector"], pod_labels), "the PodDisruptionBudget does not select the pods")
    check(pdb["spec"].get("maxUnavailable") == 1, "disruptions take one pod at a time")
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if overlay == "acme":
        check(not hpas, "one pod owns the ACME certificate: no autoscaler")
    else:
        hpa = one(docs, "HorizontalPodAutoscaler", "tandem")
        ref = hpa["spec"]["scaleTargetRef"]
        check(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"], "the autoscaler must scale the Deployment")
        check(hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"], "the autoscaler keeps two pods at least")
        check("replicas" not in dep["spec"], "with an autoscaler the Deployment must not set replicas (every apply would reset them)")
        check(dep["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"].get("cpu"), "CPU autoscaling needs a CPU request")
        check(any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]), "the autoscaler follows CPU")
        in_flight = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        if "autoscale-in-flight" in components:
            check(len(in_flight) == 1 and in_flight[0]["pods"]["metric"]["name"] == "tandem_requests_in_flight", "the in-flight component adds tandem's own metric")
        else:
            check(len(hpa["spec"]["metrics"]) == 1, "only CPU without the in-flight component")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    check(all(selects(p["spec"]["podSelector"], pod_labels) for p in policies), "a NetworkPolicy does not select the pods")
    base = one(docs, "NetworkPolicy", "tandem")
    check(base["spec"]["policyTypes"] == ["Ingress", "Egress"] and base["spec"]["egress"] == [], "the base policy denies all egress")
    open_in = {p["port"] for rule in base["spec"]["ingress"] if "from" not in rule for p in rule["ports"]}
    check(open_in == {"http", "https"}, "from anywhere, only the http and https ports")
    limited = [rule for rule in base["spec"]["ingress"] if "from" in rule]
    check(len(limited) == 1 and {p["port"] for p in limited[0]["ports"]} == {"metrics"}, "the metrics port from one place")
    check(all(set(f) == {"namespaceSelector"} for f in limited[0]["from"]), "the metrics port only from the monitoring namespace")
    check({p["port"] for rule in base["spec"]["ingress"] for p in rule["ports"]} <= port_names, "a policy names a port the container does not have")
    egress_ports = {p["port"] for pol in policies for rule in pol["spec"].get("egress", []) for p in rule.get("ports", [])}
    if overlay == "acme":
        check({53, 443} <= egress_ports, "ACME needs DNS and HTTPS out")
    else:
        check(not egress_ports, "no egress without ACME")
    return svc


def check_monitoring(docs, svc):
    sm = one(docs, "ServiceMonitor", "tandem")
    check(sm["apiVersion"] == "monitoring.coreos.com/v1", "the ServiceMonitor is monitoring.coreos.com/v1")
    check(selects(sm["spec"]["selector"], svc["metadata"]["labels"]), "the ServiceMonitor does not select the Service")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        check(ep["port"] in svc_ports and ep["path"] == "/metrics", "the ServiceMonitor scrapes /metrics on a Service port")
    target = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
    check([target[ep["port"]] for ep in sm["spec"]["endpoints"]] == ["metrics"], "scrape the metrics port (METRICS_PUBLIC=false keeps /metrics off the others)")
    rule = one(docs, "PrometheusRule", "tandem")
    shipped = yaml.safe_load((root / "deploy/prometheus/tandem-rules.yaml").read_text())
    check(rule["spec"]["groups"] == shipped["groups"], "the PrometheusRule differs from deploy/prometheus/tandem-rules.yaml")


def tandem_accepts(env, overlay):
    """`tandem check` on the Deployment's environment (paths that exist only in the pod made here)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(env)
        if env.get("SSL_CERTIFICATE", "").startswith("/"):
            # A real certificate where the pod's would be mounted.
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                            "-subj", "/CN=tandem", "-days", "2", "-keyout", f"{tmp}/tls.key", "-out", f"{tmp}/tls.crt"],
                           check=True, capture_output=True)
            env["SSL_CERTIFICATE"] = f"{tmp}/tls.crt"
        env["MODEL_CACHE_DIR"] = f"{tmp}/cache"
        out = subprocess.run([tandem, "check"], env={"PATH": os.environ.get("PATH", ""), **env}, capture_output=True, text=True)
    check(out.returncode == 0, f"{overlay}: tandem check refused the Deployment's environment:\n{out.stdout}{out.stderr}")
    check("no variable is ignored" in out.stdout, f"{overlay}: tandem ignores a variable the Deployment sets:\n{out.stdout}{out.stderr}")


if shutil.which("kubectl") is None:
    print("skip: kubectl (with kustomize) is not installed")
    sys.exit(0)

BUILDS = [(o, []) for o in OVERLAYS] + [(o, ["monitoring"]) for o in OVERLAYS] + [
    ("plain", ["autoscale-in-flight"]),
    ("cert-manager", ["monitoring", "autoscale-in-flight"]),
]
for overlay, components in BUILDS:
    monitoring = "monitoring" in components
    what = " + ".join([overlay, *components])
    docs = build(overlay, components)
    validate_core(docs, what)
    dep, pod_labels, port_names, env = check_deployment(docs, overlay)
    svc = check_around(docs, dep, pod_labels, port_names, overlay, components)
    if monitoring:
        check_monitoring(docs, svc)
    else:
        check(not [d for d in docs if d["kind"] in ("ServiceMonitor", "PrometheusRule")], "monitoring objects only with the component")
        tandem_accepts(env, overlay)
    print(f"ok: {what}: objects fit each other and tandem")

cm = yaml.safe_load((k8s / "base/configmap-models.yaml").read_text())
digits = root / "models/digits"
check(cm["data"]["digits.config.pbtxt"] == (digits / "config.pbtxt").read_text(), "the ConfigMap's config.pbtxt differs from models/digits")
check(base64.b64decode(cm["binaryData"]["digits.model.onnx"]) == (digits / "1/model.onnx").read_bytes(), "the ConfigMap's model.onnx differs from models/digits")
print("ok: every manifest checked")
