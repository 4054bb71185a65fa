package daemon

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The CLI against a real daemon on a unix socket: status (text and JSON),
// record with naming flags, message, watch, stages, stop.
func TestCLIAgainstDaemon(t *testing.T) {
	at := newAPITest(t, "", "")
	sock := at.ctl.SocketPath()
	run := func(args ...string) (string, error) {
		t.Helper()
		var out, errOut bytes.Buffer
		err := clientCommand(args[0], append(args[1:], "--socket", sock), &out, &errOut)
		return out.String() + errOut.String(), err
	}
	must := func(want string, args ...string) string {
		t.Helper()
		out, err := run(args...)
		if err != nil {
			t.Fatalf("ephysd %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		if !strings.Contains(out, want) {
			t.Fatalf("ephysd %s:\n%s\ndoes not say %q", strings.Join(args, " "), out, want)
		}
		return out
	}
	must("mode        IDLE", "status")
	var st ControlStatus
	if err := json.Unmarshal([]byte(must(`"mode": "IDLE"`, "status", "--json")), &st); err != nil || st.Mode != Idle || st.Health != "ok" {
		t.Fatalf("status --json: %+v %v", st, err)
	}
	out := must("recording into", "record", "--prepend", "ratA_", "--base", "s1", "--dir", filepath.Join(at.dir, "data"))
	wantDir := filepath.Join(at.dir, "data", "ratA_s1", "Record Node 102", "experiment1", "recording1")
	if !strings.Contains(out, wantDir) {
		t.Fatalf("record:\n%s\nwant %s", out, wantDir)
	}
	must("message recorded", "message", "trial", "1", "start")
	out = must("recording   "+wantDir, "status")
	for _, want := range []string{"mode        RECORD", "source      Simulated Headstage (sim): 4 channels at 30000 Hz", "samples/s", "latency     per block p50", "overruns    0 blocks", "stages      101 pass [running]  p50"} {
		if !strings.Contains(out, want) {
			t.Fatalf("status:\n%s\ndoes not say %q", out, want)
		}
	}
	out = must("RECORD", "status", "--watch", "--count", "2")
	if n := strings.Count(out, "\n"); n != 2 {
		t.Fatalf("status --watch on a non-terminal: want 2 lines, got\n%s", out)
	}
	must("101 pass [running]", "stages")
	must("reloaded 1 Python stages", "stages", "reload")
	must("recording saved in "+wantDir, "stop")
	must("IDLE", "idle")
	if _, err := os.Stat(filepath.Join(wantDir, "events", "MessageCenter", "text.npy")); err != nil {
		t.Fatalf("the message was not recorded: %v", err)
	}
	if out, err := run("message", "late"); err == nil || !strings.Contains(err.Error(), "not acquiring") {
		t.Fatalf("message while IDLE: %v %s", err, out)
	}
	must("ACQUIRE", "acquire")
	must("configuration reloaded", "reload")
	must("IDLE", "stop")
	if _, err := run("stages", "module", "999", "x.py"); err == nil || !strings.Contains(err.Error(), "no Python stage has id 999") {
		t.Fatalf("stages module 999: %v", err)
	}
	if _, err := run("status", "extra"); err == nil {
		t.Fatal("an unexpected argument must be refused")
	}
	// A 404 carries the daemon's reason, not a guess.
	cl, err := newClient(sock)
	if err != nil {
		t.Fatal(err)
	}
	_, err = cl.call(http.MethodGet, "/api/no/such/path", nil, nil)
	if !errors.Is(err, errNotFound) || strings.Contains(err.Error(), "older than this client") {
		t.Fatalf("unknown path: %v", err)
	}
}

// Without a daemon, the CLI says so and what to check.
func TestCLINoDaemon(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "control.sock")
	var out bytes.Buffer
	err := clientCommand("status", []string{"--socket", sock}, &out, &out)
	if err == nil || !strings.Contains(err.Error(), "no ephysd is listening on "+sock+" — is the service running? (systemctl status ephysd)") {
		t.Fatalf("no daemon: %v", err)
	}
	if os.Geteuid() == 0 {
		return // root opens every socket
	}
	at := newAPITest(t, "", "")
	os.Chmod(at.ctl.SocketPath(), 0)
	err = clientCommand("status", []string{"--socket", at.ctl.SocketPath()}, &out, &out)
	if err == nil || !strings.Contains(err.Error(), "permission denied") || !strings.Contains(err.Error(), "add yourself to group") {
		t.Fatalf("permission denied: %v", err)
	}
}
