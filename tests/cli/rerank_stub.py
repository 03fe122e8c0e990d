"""A stand-in /rerank server for tests/cli/test_teach_cli.sh (Python standard library only).

    python3 tests/cli/rerank_stub.py MODE [N]

Listens on 127.0.0.1 at a free port and prints it. POST /rerank answers TEI's format with
score = the UTF-8 byte length of each text (so the expected teacher file is easy to compute),
sorted by score, after misbehaving as MODE says:
  ok          always answers
  flaky N     the first N requests get HTTP 503, then answers
  drop N      the first N requests get the connection closed without an answer, then answers
  malformed   answers 200 with a JSON object instead of the list
  badindex    answers 200 with index 0 for every entry
  notfound    answers 404
  slow        sleeps 5 s before answering
Each request line is appended to the file named by $STUB_LOG when set.
"""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

MODE = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 0
seen = 0


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        global seen
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        seen += 1
        if os.environ.get("STUB_LOG"):
            with open(os.environ["STUB_LOG"], "a") as f:
                f.write(json.dumps({"n": seen, "texts": len(req["texts"]), "raw": req.get("raw_scores"), "port": self.client_address[1]}) + "\n")
        if MODE == "flaky" and seen <= N:
            return self.answer(503, {"error": "overloaded", "error_type": "Overloaded"})
        if MODE == "drop" and seen <= N:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if MODE == "malformed":
            return self.answer(200, {"scores": [1, 2]})
        if MODE == "notfound":
            return self.answer(404, {"error": "no such route"})
        if MODE == "slow":
            time.sleep(5)
        out = sorted(({"index": i, "score": float(len(t.encode()))} for i, t in enumerate(req["texts"])),
                     key=lambda x: -x["score"])
        if MODE == "badindex":
            out = [{"index": 0, "score": x["score"]} for x in out]
        self.answer(200, out)


srv = HTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
