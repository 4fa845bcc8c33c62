"""A fake forge API for the CI example tests: comments (GitHub/Forgejo) or merge
request notes (GitLab) kept in memory, written to STATE after every change.

Prints the port it listens on (127.0.0.1) as its first line. GET on a list URL
returns the comments; POST adds one; PUT/PATCH on `<list>/<id>` or
`.../comments/<id>` replaces one's body. Requests without the expected auth header
get 401.
"""
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

STATE, AUTH_HEADER, AUTH_VALUE = sys.argv[1], sys.argv[2], sys.argv[3]
comments = []


def save():
    with open(STATE, "w") as f:
        json.dump(comments, f)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, value):
        data = json.dumps(value).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorised(self):
        if self.headers.get(AUTH_HEADER) != AUTH_VALUE:
            self.reply(401, {"message": "unauthorised"})
            return False
        return True

    def body(self):
        n = int(self.headers.get("Content-Length", "0"))
        return json.loads(self.rfile.read(n))["body"]

    def do_GET(self):
        if self.authorised():
            self.reply(200, comments)

    def do_POST(self):
        if self.authorised():
            c = {"id": 100 + len(comments), "body": self.body()}
            comments.append(c)
            save()
            self.reply(201, c)

    def update(self):
        if not self.authorised():
            return
        m = re.search(r"/(\d+)$", self.path)
        for c in comments:
            if m and c["id"] == int(m.group(1)):
                c["body"] = self.body()
                save()
                return self.reply(200, c)
        self.reply(404, {"message": "no such comment"})

    do_PUT = update
    do_PATCH = update


server = HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
