"""Self-test of fake_gce: behaviour, refusals, and shapes against ../../testdata.

Run: cd providers/gcp/tests/support && python3 -m unittest test_fake_gce -v
"""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import unittest
import uuid
from urllib.parse import urlencode, urlsplit

from fake_gce import FakeGce

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "..", "..", "testdata")
STAGE_MS = 40
PROJECT = "example-project"
ZONE = "us-central1-a"
IMAGE = "projects/debian-cloud/global/images/family/debian-12"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


def recorded(name):
    with open(os.path.join(TESTDATA, name)) as f:
        return json.load(f)


def instance_body(name, zone=ZONE, machine_type="e2-small", labels=None, metadata=None, nat=False, **extra):
    body = {
        "name": name,
        "machineType": f"zones/{zone}/machineTypes/{machine_type}",
        "disks": [{"boot": True, "autoDelete": True, "initializeParams": {"sourceImage": IMAGE}}],
        "networkInterfaces": [{"network": "global/networks/default"}],
    }
    if nat:
        body["networkInterfaces"][0]["accessConfigs"] = [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]
    if labels:
        body["labels"] = labels
    if metadata:
        body["metadata"] = {"items": [{"key": k, "value": v} for k, v in metadata.items()]}
    body.update(extra)
    return body


def json_type(value):
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


# Maps keyed by user data: their keys are not part of the shape.
DYNAMIC_MAPS = {"labels", "dimensions", "perLocationStatus", "metadatas"}


class FakeGceTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fake = FakeGce(seed=7, stage_ms=STAGE_MS).start()
        cls.host, cls.port = urlsplit(cls.fake.url).hostname, urlsplit(cls.fake.url).port

    @classmethod
    def tearDownClass(cls):
        cls.fake.stop()

    def setUp(self):
        self.call("POST", "/_fake/reset")
        self.call("POST", "/_fake/config", {"stage_ms": STAGE_MS})

    # -- helpers ------------------------------------------------------------------

    def call(self, method, path, body=None, query=None):
        """One request on a fresh connection: (status, parsed JSON)."""
        if query:
            path += "?" + urlencode(query)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            data = json.dumps(body) if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def api(self, method, path, body=None, query=None, project=PROJECT):
        return self.call(method, f"/compute/v1/projects/{project}{path}", body, query)

    def insert(self, body, zone=ZONE, request_id=None):
        status, op = self.api("POST", f"/zones/{zone}/instances", body,
                              {"requestId": request_id or str(uuid.uuid4())})
        self.assertEqual(status, 200, op)
        return op

    def get(self, name, zone=ZONE):
        return self.api("GET", f"/zones/{zone}/instances/{name}")

    def wait(self, op):
        """Waits on an operation (zonal or global) until DONE."""
        scope = f"/zones/{op['zone'].rsplit('/', 1)[-1]}" if "zone" in op else "/global"
        for _ in range(50):
            status, op = self.api("POST", f"{scope}/operations/{op['name']}/wait")
            self.assertEqual(status, 200, op)
            if op["status"] == "DONE":
                return op
        self.fail(f"operation {op['name']} never finished")

    def running(self, name, zone=ZONE, **kw):
        op = self.wait(self.insert(instance_body(name, zone=zone, **kw), zone=zone))
        self.assertNotIn("error", op)
        return self.get(name, zone)[1]

    def assert_error(self, status, body, code, reason):
        self.assertEqual(status, code, body)
        self.assertEqual(body["error"]["code"], code)
        self.assertEqual(body["error"]["errors"][0]["reason"], reason, body)

    def assert_shape(self, want, got, path="$"):
        """Every key of the recording is in the fake's answer, with the same JSON type."""
        self.assertEqual(json_type(got), json_type(want), f"{path}: {got!r} vs recorded {want!r}")
        last = path.rsplit(".", 1)[-1]
        if isinstance(want, dict) and (last in DYNAMIC_MAPS or path == "$.items"):
            if want:
                self.assertTrue(got, f"{path}: empty, recording has entries")
            for key, value in got.items():
                peers = [w for w in want.values() if json_type(w) == json_type(value)
                         and (not isinstance(w, dict) or set(w) & set(value))]
                self.assertTrue(peers, f"{path}[{key}]: {value!r} matches no recorded value's shape")
                self.assert_shape(peers[0], value, f"{path}[{key}]")
        elif isinstance(want, dict):
            for key, value in want.items():
                self.assertIn(key, got, f"{path}.{key} missing from the fake's answer")
                if key == "kind":
                    self.assertEqual(got[key], value, f"{path}.kind")
                self.assert_shape(value, got[key], f"{path}.{key}")
        elif isinstance(want, list):
            if want:
                self.assertTrue(got, f"{path}: empty, recording has entries")
            for i, (w, g) in enumerate(zip(want, got)):
                self.assert_shape(w, g, f"{path}[{i}]")

    # -- lifecycle ------------------------------------------------------------------

    def test_insert_progresses_to_running_in_real_shapes(self):
        body = instance_body("mp-demo-worker-0001", nat=True,
                             labels={"motorpool-cluster": "demo", "motorpool-role": "worker"},
                             metadata={"startup-script": "#!/bin/sh\nexec motorpool agent\n"},
                             tags={"items": ["motorpool"]},
                             serviceAccounts=[{"email": "default", "scopes": [CLOUD_PLATFORM]}])
        op = self.insert(body)
        self.assertEqual(op["status"], "PENDING")
        self.assertEqual(op["operationType"], "insert")
        self.assertRegex(op["name"], r"^operation-[0-9]+-[0-9a-f]+")
        self.assertTrue(op["zone"].endswith(f"/projects/{PROJECT}/zones/{ZONE}"))
        self.assert_shape(recorded("operation-pending.json"), op)
        self.assertEqual(self.get("mp-demo-worker-0001")[1]["status"], "PROVISIONING")

        seen_op, seen_vm = set(), set()
        for _ in range(200):
            _, now = self.api("GET", f"/zones/{ZONE}/operations/{op['name']}")
            seen_op.add(now["status"])
            seen_vm.add(self.get("mp-demo-worker-0001")[1]["status"])
            if now["status"] == "DONE":
                break
            time.sleep(0.005)
        self.assertEqual(seen_op, {"PENDING", "RUNNING", "DONE"})
        self.assertTrue({"STAGING", "RUNNING"} <= seen_vm, seen_vm)
        self.assertEqual(now["progress"], 100)
        self.assertNotIn("error", now)

        _, vm = self.get("mp-demo-worker-0001")
        self.assertEqual(vm["status"], "RUNNING")
        self.assertEqual(vm["machineType"], "https://www.googleapis.com/compute/v1/projects/"
                         f"{PROJECT}/zones/{ZONE}/machineTypes/e2-small")
        self.assertRegex(vm["networkInterfaces"][0]["networkIP"], r"^10\.128\.")
        self.assertRegex(vm["creationTimestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$")
        self.assert_shape(recorded("instance.json"), vm)

    def test_delete(self):
        self.running("gone-soon")
        status, op = self.api("DELETE", f"/zones/{ZONE}/instances/gone-soon", query={"requestId": str(uuid.uuid4())})
        self.assertEqual((status, op["operationType"]), (200, "delete"))
        self.assertEqual(self.get("gone-soon")[1]["status"], "STOPPING")
        self.wait(op)
        status, body = self.get("gone-soon")
        self.assert_error(status, body, 404, "notFound")
        self.assert_shape(recorded("error-not-found.json"), body)
        status, body = self.api("DELETE", f"/zones/{ZONE}/instances/gone-soon")
        self.assert_error(status, body, 404, "notFound")
        self.running("kept", deletionProtection=True)
        status, body = self.api("DELETE", f"/zones/{ZONE}/instances/kept")
        self.assert_error(status, body, 400, "invalidResourceUsage")

    def test_stop_then_start(self):
        self.running("sleeper")
        _, op = self.api("POST", f"/zones/{ZONE}/instances/sleeper/stop")
        self.assertEqual(op["operationType"], "stop")
        self.assertEqual(self.get("sleeper")[1]["status"], "STOPPING")
        self.wait(op)
        self.assertEqual(self.get("sleeper")[1]["status"], "TERMINATED")
        _, op = self.api("POST", f"/zones/{ZONE}/instances/sleeper/start")
        self.assertEqual(op["operationType"], "start")
        self.assertEqual(self.get("sleeper")[1]["status"], "STAGING")
        self.wait(op)
        self.assertEqual(self.get("sleeper")[1]["status"], "RUNNING")

    # -- bulkInsert and quota ---------------------------------------------------------------

    def bulk(self, count, min_count=None, zone=ZONE, pattern="mp-w-####", **props):
        body = {"count": count, "namePattern": pattern, "instanceProperties": {
            "machineType": "e2-small",
            "disks": [{"boot": True, "autoDelete": True, "initializeParams": {"sourceImage": IMAGE}}],
            "networkInterfaces": [{"network": "global/networks/default"}],
            "labels": {"motorpool-cluster": "demo"},
            "scheduling": {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE"}, **props}}
        if min_count is not None:
            body["minCount"] = str(min_count)  # int64 travels as a string
        return self.api("POST", f"/zones/{zone}/instances/bulkInsert", body, {"requestId": str(uuid.uuid4())})

    def test_bulk_insert_is_all_or_nothing_under_quota(self):
        self.call("POST", "/_fake/config", {"cpu_quota": {"us-central1": 8}})
        status, op = self.bulk(5, min_count=5)  # 5 x 2 vCPUs > 8
        self.assertEqual((status, op["operationType"]), (200, "bulkInsert"))
        done = self.wait(op)
        self.assertEqual(done["error"]["errors"][0]["code"], "QUOTA_EXCEEDED")
        self.assertEqual(done["error"]["errors"][0]["message"],
                         "Quota 'CPUS' exceeded.  Limit: 8.0 in region us-central1.")
        self.assertEqual((done["httpErrorStatusCode"], done["httpErrorMessage"]), (403, "FORBIDDEN"))
        self.assert_shape({k: v for k, v in recorded("operation-done-error-quota.json").items()
                           if k not in ("targetLink", "targetId")}, done)
        self.assertEqual(self.call("GET", "/_fake/instances")[1]["instances"], [])

        status, op = self.bulk(4, min_count=4)
        done = self.wait(op)
        self.assertNotIn("error", done)
        self.assertEqual(done["instancesBulkInsertOperationMetadata"]["perLocationStatus"][f"zones/{ZONE}"]
                         ["createdVmCount"], 4)
        vms = self.call("GET", "/_fake/instances")[1]["instances"]
        self.assertEqual([v["name"] for v in vms], [f"mp-w-000{i}" for i in range(1, 5)])
        self.assertEqual(vms[0]["scheduling"]["provisioningModel"], "SPOT")
        self.assertEqual(vms[0]["scheduling"]["instanceTerminationAction"], "DELETE")

        # minCount below count: as many as fit, numbered after the biggest existing name.
        self.call("POST", "/_fake/config", {"cpu_quota": {"us-central1": 14}})
        done = self.wait(self.bulk(5, min_count=2)[1])
        status_ = done["instancesBulkInsertOperationMetadata"]["perLocationStatus"][f"zones/{ZONE}"]
        self.assertEqual((status_["createdVmCount"], status_["failedToCreateVmCount"]), (3, 2))
        names = [v["name"] for v in self.call("GET", "/_fake/instances")[1]["instances"]]
        self.assertEqual(names[-3:], ["mp-w-0005", "mp-w-0006", "mp-w-0007"])

    def test_bulk_insert_refuses_a_machine_type_url_and_bad_bodies(self):
        done = self.wait(self.bulk(1, machineType=f"zones/{ZONE}/machineTypes/e2-small")[1])
        self.assertEqual(done["error"]["errors"][0]["code"], "INTERNAL_ERROR")
        status, body = self.bulk(1, machineType="e2-mega")
        self.assert_error(status, body, 400, "invalid")
        status, body = self.api("POST", f"/zones/{ZONE}/instances/bulkInsert", {"count": 1})
        self.assert_error(status, body, 400, "invalid")  # neither namePattern nor perInstanceProperties

    # -- idempotency, names, validation -------------------------------------------------------

    def test_request_id_makes_a_retry_return_the_same_operation(self):
        rid = str(uuid.uuid4())
        first = self.insert(instance_body("once"), request_id=rid)
        again = self.insert(instance_body("once"), request_id=rid)
        self.assertEqual((again["name"], again["id"]), (first["name"], first["id"]))
        self.assertEqual(first["clientOperationId"], rid)
        self.assertEqual(len(self.call("GET", "/_fake/instances")[1]["instances"]), 1)
        for bad in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
            status, body = self.api("POST", f"/zones/{ZONE}/instances", instance_body("twice"), {"requestId": bad})
            self.assert_error(status, body, 400, "invalid")
        # A new requestId for the same name: the name is taken, synchronously.
        status, body = self.api("POST", f"/zones/{ZONE}/instances", instance_body("once"),
                                {"requestId": str(uuid.uuid4())})
        self.assert_error(status, body, 409, "alreadyExists")

    def test_refuses_what_the_api_refuses(self):
        cases = [
            (instance_body("Bad_Name"), "invalid"),
            (instance_body("ok", machine_type="e2-mega"), "invalid"),
            (instance_body("ok", machineType="e2-small"), "invalid"),  # insert wants a URL
            (instance_body("ok", disks=[]), "required"),
            (instance_body("ok", networkInterfaces=[]), "required"),
            (instance_body("ok", metadata={"bad key": "x"}), "invalid"),
            (instance_body("ok", metadata={"big": "x" * (256 * 1024 + 1)}), "invalid"),
            (dict(instance_body("ok"), metadata={"items": [{"key": "a", "value": "1"}, {"key": "a", "value": "2"}]}),
             "invalid"),
            (dict(instance_body("ok"), colour="blue"), "invalid"),  # unknown field
        ]
        for body, reason in cases:
            with self.subTest(body=str(body)[:80]):
                status, err = self.api("POST", f"/zones/{ZONE}/instances", body)
                self.assert_error(status, err, 400, reason)
        status, err = self.api("GET", "/zones/us-central1-z/instances")
        self.assert_error(status, err, 400, "invalid")
        self.assertIn("Unknown zone", err["error"]["message"])
        status, err = self.api("GET", f"/zones/{ZONE}/instances", query={"colour": "blue"})
        self.assert_error(status, err, 400, "invalid")

    def test_invalid_labels_are_refused(self):
        for labels, named in (({"Env": "prod"}, "Env"), ({"env": "Prod"}, "Prod"),
                              ({f"k{i}": "v" for i in range(65)}, "65")):
            status, body = self.api("POST", f"/zones/{ZONE}/instances", instance_body("lab", labels=labels))
            self.assert_error(status, body, 400, "invalid")
            self.assertIn(named, body["error"]["message"])
        vm = self.running("lab")
        status, body = self.api("POST", f"/zones/{ZONE}/instances/lab/setLabels",
                                {"labels": {"env": "UPPER"}, "labelFingerprint": vm["labelFingerprint"]})
        self.assert_error(status, body, 400, "invalid")
        self.assertIn("UPPER", body["error"]["message"])

    # -- fingerprints -------------------------------------------------------------------------

    def test_set_labels_needs_the_current_fingerprint(self):
        vm = self.running("fp")
        old = vm["labelFingerprint"]
        # Fingerprints are URL-safe base64, as the real API sends them.
        for fp in (old, vm["fingerprint"], vm["metadata"]["fingerprint"]):
            self.assertRegex(fp, r"^[A-Za-z0-9_-]+=*$")
        status, op = self.api("POST", f"/zones/{ZONE}/instances/fp/setLabels",
                              {"labels": {"motorpool-role": "worker"}, "labelFingerprint": old})
        self.assertEqual((status, op["operationType"]), (200, "setLabels"))
        self.wait(op)
        vm = self.get("fp")[1]
        self.assertEqual(vm["labels"], {"motorpool-role": "worker"})
        self.assertNotEqual(vm["labelFingerprint"], old)
        for stale in ({"labels": {}, "labelFingerprint": old}, {"labels": {}}):
            status, body = self.api("POST", f"/zones/{ZONE}/instances/fp/setLabels", stale)
            self.assert_error(status, body, 412, "conditionNotMet")
            self.assert_shape(recorded("error-condition-not-met.json"), body)

    def test_set_metadata_replaces_items_and_needs_the_fingerprint(self):
        vm = self.running("md", metadata={"a": "1", "b": "2"})
        fp = vm["metadata"]["fingerprint"]
        _, op = self.api("POST", f"/zones/{ZONE}/instances/md/setMetadata",
                         {"fingerprint": fp, "items": [{"key": "startup-script", "value": "echo hi"}]})
        self.assertEqual(op["operationType"], "setMetadata")
        self.wait(op)
        fake_view = self.call("GET", "/_fake/instances")[1]["instances"][0]
        self.assertEqual(fake_view["metadata"], {"startup-script": "echo hi"})
        status, body = self.api("POST", f"/zones/{ZONE}/instances/md/setMetadata", {"fingerprint": fp, "items": []})
        self.assert_error(status, body, 412, "conditionNotMet")

    def test_project_common_metadata(self):
        status, project = self.api("GET", "")
        self.assertEqual((status, project["kind"], project["name"]), (200, "compute#project", PROJECT))
        fp = project["commonInstanceMetadata"]["fingerprint"]
        status, op = self.api("POST", "/setCommonInstanceMetadata",
                              {"fingerprint": fp, "items": [{"key": "motorpool-boot", "value": "{}"}]},
                              {"requestId": str(uuid.uuid4())})
        self.assertEqual((status, op["operationType"]), (200, "setCommonInstanceMetadata"))
        self.assertNotIn("zone", op)
        self.assertIn("/global/operations/", op["selfLink"])
        self.wait(op)
        _, project = self.api("GET", "")
        self.assertEqual(project["commonInstanceMetadata"]["items"], [{"key": "motorpool-boot", "value": "{}"}])
        status, body = self.api("POST", "/setCommonInstanceMetadata", {"fingerprint": fp, "items": []})
        self.assert_error(status, body, 412, "conditionNotMet")

    def test_common_metadata_is_a_compare_and_swap_on_its_fingerprint(self):
        # What the project lock relies on: every accepted change makes a new
        # fingerprint, and of two writers that read the same one, only the
        # first is accepted; the other is refused 412 conditionNotMet. (The
        # discovery document's Metadata.fingerprint: it "changes after every
        # request to modify or update metadata", and a stale one fails "with
        # error 412 conditionNotMet".)
        _, project = self.api("GET", "")
        fp = project["commonInstanceMetadata"]["fingerprint"]
        seen = {fp}
        for value in ("a", "b", "b"):
            status, op = self.api("POST", "/setCommonInstanceMetadata",
                                  {"fingerprint": fp, "items": [{"key": "motorpool-lock-demo", "value": value}]})
            self.assertEqual(status, 200, op)
            self.wait(op)
            _, project = self.api("GET", "")
            fp = project["commonInstanceMetadata"]["fingerprint"]
            self.assertNotIn(fp, seen, "a new fingerprint on every change, even to the same items")
            seen.add(fp)
        first = {"fingerprint": fp, "items": [{"key": "motorpool-lock-demo", "value": "first"}]}
        second = {"fingerprint": fp, "items": [{"key": "motorpool-lock-demo", "value": "second"}]}
        status, op = self.api("POST", "/setCommonInstanceMetadata", first)
        self.assertEqual(status, 200, op)
        status, body = self.api("POST", "/setCommonInstanceMetadata", second)
        self.assert_error(status, body, 412, "conditionNotMet")
        error = body["error"]
        self.assertEqual(error["message"], "Supplied fingerprint does not match current metadata fingerprint.")
        self.assertEqual(error["errors"][0]["message"], error["message"])
        self.assertEqual(error["errors"][0]["domain"], "global")
        self.wait(op)
        _, project = self.api("GET", "")
        self.assertEqual(project["commonInstanceMetadata"]["items"],
                         [{"key": "motorpool-lock-demo", "value": "first"}])
        # Many writers at once with one fingerprint: exactly one is accepted.
        fp = project["commonInstanceMetadata"]["fingerprint"]
        results = []

        def writer(i):
            results.append(self.api("POST", "/setCommonInstanceMetadata",
                                    {"fingerprint": fp, "items": [{"key": "k", "value": str(i)}]})[0])
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), [200] + [412] * 7)

    # -- listing --------------------------------------------------------------------------

    def test_aggregated_list_pages_through_a_label_filter(self):
        zones = ["us-central1-a", "us-central1-b", "us-east1-b", "europe-west1-b"]
        ops = [self.insert(instance_body(f"w-{i}", zone=zones[i % 4], labels={"motorpool-cluster": "demo"}),
                           zone=zones[i % 4]) for i in range(7)]
        ops += [self.insert(instance_body(f"other-{i}", labels={"motorpool-cluster": "else"})) for i in range(2)]
        for op in ops:
            self.wait(op)
        names, pages, token = [], 0, None
        while True:
            query = {"filter": 'labels.motorpool-cluster = "demo"', "maxResults": 3,
                     "returnPartialSuccess": "true"}
            if token:
                query["pageToken"] = token
            status, page = self.api("GET", "/aggregated/instances", query=query)
            self.assertEqual(status, 200, page)
            pages += 1
            found = [vm["name"] for scope in page["items"].values() for vm in scope.get("instances", [])]
            self.assertLessEqual(len(found), 3)
            names += found
            for scope, body in page["items"].items():
                if "warning" in body:
                    self.assertEqual(body["warning"]["code"], "NO_RESULTS_ON_PAGE")
                    self.assertEqual(body["warning"]["data"], [{"key": "scope", "value": scope}])
            if pages == 1:
                self.assert_shape(recorded("instance-aggregated-list.json"), page)
            token = page.get("nextPageToken")
            if not token:
                break
        self.assertEqual(pages, 3)
        self.assertEqual(sorted(names), sorted(f"w-{i}" for i in range(7)))

        for query in ({"maxResults": 501}, {"pageToken": "bm90LWEtdG9rZW4"}):
            status, body = self.api("GET", "/aggregated/instances", query=query)
            self.assert_error(status, body, 400, "invalid")
        status, body = self.api("GET", f"/zones/{ZONE}/instances",
                                query={"filter": "(status = RUNNING) (labels.motorpool-cluster:*)"})
        self.assertEqual(status, 200, body)
        self.assertEqual(body["kind"], "compute#instanceList")
        self.assertEqual(sorted(vm["name"] for vm in body["items"]), ["other-0", "other-1", "w-0", "w-4"])
        status, body = self.api("GET", f"/zones/{ZONE}/instances",
                                query={"filter": "status != TERMINATED AND name = w-0"})
        self.assertEqual([vm["name"] for vm in body["items"]], ["w-0"])

    def test_unsupported_filters_are_refused(self):
        for text in ('labels.a = "b" OR labels.c = "d"', "cpuPlatform = Intel", "name eq w-.*",
                     "labels.a > 3", "status = SLEEPY", "name = w-*", "(labels.a = b", "labels.a ="):
            with self.subTest(filter=text):
                status, body = self.api("GET", "/aggregated/instances", query={"filter": text})
                self.assert_error(status, body, 400, "invalid")
                self.assertIn("Invalid list filter expression", body["error"]["message"])

    # -- capacity and faults ----------------------------------------------------------------------

    def test_exhausted_zone_fails_the_operation(self):
        self.call("POST", "/_fake/config", {"exhausted_zones": [ZONE]})
        op = self.insert(instance_body("no-room"))
        done = self.wait(op)
        error = done["error"]["errors"][0]
        self.assertEqual(error["code"], "ZONE_RESOURCE_POOL_EXHAUSTED")
        self.assertIn(f"The zone 'projects/{PROJECT}/zones/{ZONE}' does not have enough resources", error["message"])
        self.assertEqual((done["httpErrorStatusCode"], done["httpErrorMessage"]), (503, "SERVICE UNAVAILABLE"))
        self.assert_error(*self.get("no-room"), 404, "notFound")
        self.assertNotIn("error", self.wait(self.insert(instance_body("roomy", zone="us-central1-b"),
                                                        zone="us-central1-b")))

    def test_lost_fault_performs_the_action_and_drops_the_answer(self):
        self.call("POST", "/_fake/config", {"faults": {"rate": 1.0, "kinds": ["lost"], "methods": ["POST"]}})
        rid = str(uuid.uuid4())
        with self.assertRaises((http.client.HTTPException, ConnectionError)):
            self.insert(instance_body("ghost"), request_id=rid)
        self.call("POST", "/_fake/config", {"faults": {"rate": 0.0}})
        status, vm = self.get("ghost")
        self.assertEqual(status, 200, vm)
        # The retry with the same requestId gets the original operation, not a 409.
        op = self.insert(instance_body("ghost"), request_id=rid)
        self.assertEqual(op["targetId"], vm["id"])

    def test_rate_limit_fault_and_request_counts(self):
        self.call("POST", "/_fake/config", {"faults": {"rate": 1.0, "kinds": ["429"], "methods": ["GET"], "seed": 3}})
        status, body = self.api("GET", "/aggregated/instances")
        self.assert_error(status, body, 429, "rateLimitExceeded")
        self.assert_shape(recorded("error-rate-limited.json"), body)
        self.call("POST", "/_fake/config", {"faults": {"kinds": ["503"]}})
        self.assert_error(*self.api("GET", f"/zones/{ZONE}/instances"), 503, "backendError")
        self.call("POST", "/_fake/config", {"faults": {"rate": 0}})
        self.assertEqual(self.api("GET", "/aggregated/instances")[0], 200)
        counts = self.call("GET", "/_fake/requests")[1]
        self.assertEqual(counts["GET aggregated/instances"], 2)
        self.assertEqual(counts["GET instances"], 1)

    def test_control_api_refuses_bad_config(self):
        for bad in ({"stage_ms": -1}, {"cpu_quota": {"mars-1": 3}}, {"exhausted_zones": ["nowhere-a"]},
                    {"faults": {"kinds": ["404"]}}, {"colour": 1}):
            self.assertEqual(self.call("POST", "/_fake/config", bad)[0], 400, bad)


class CommandLineTest(unittest.TestCase):
    def test_prints_one_line_and_exits_cleanly_on_sigterm(self):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_gce.py"), "--port", "0", "--seed", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            self.assertRegex(line, r"^listening on http://127\.0\.0\.1:[0-9]+\n$")
            port = int(line.rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/compute/v1/projects/p/zones/us-east1-b/instances")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=5), 0)
            self.assertEqual(proc.stdout.read(), "")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.stderr.close()

    def test_refuses_a_non_loopback_host(self):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "fake_gce.py"), "--host", "0.0.0.0"],
                              capture_output=True, text=True, timeout=10)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("loopback", proc.stderr)


if __name__ == "__main__":
    unittest.main()
