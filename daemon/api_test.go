package daemon

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
)

// passThrough is the Python stage of the API tests.
const passThrough = `
class PyProcessor:
    def __init__(self, processor, num_channels, sample_rate):
        self.n = 0
    def process(self, data):
        self.n += 1
`

// apiTest is a real Service on the simulator with its Control.
type apiTest struct {
	svc     *Service
	ctl     *Control
	dir     string // the configuration's folder (modules, recordings)
	cfgPath string
	quit    chan struct{}
	base    string // http://<addr>
}

// newAPITest starts a service (4 simulated channels at 30 kHz in real
// time, one Python stage) and its control API on 127.0.0.1:<free port> and
// a socket in a short temporary folder. extra is added to [control].
func newAPITest(t testing.TB, extra string, sim string) *apiTest {
	t.Helper()
	dir := t.TempDir()
	mod := filepath.Join(dir, "modules", "pass.py")
	os.MkdirAll(filepath.Dir(mod), 0o755)
	os.WriteFile(mod, []byte(passThrough), 0o644)
	if sim == "" {
		sim = "channels = 4\nrate = 30000\nrealtime = true"
	}
	sockDir, err := os.MkdirTemp("", "ephysd-t")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	doc := fmt.Sprintf(`
[source]
driver = "sim"
[source.sim]
%s
[[stage]]
module = %q
[recording]
parent_directory = %q
[control]
http = "127.0.0.1:0"
socket = %q
recording_dirs = [%q]
%s`, sim, mod, filepath.Join(dir, "recs"), filepath.Join(sockDir, "control.sock"), dir, extra)
	cfgPath := filepath.Join(dir, "ephysd.toml")
	os.WriteFile(cfgPath, []byte(doc), 0o644)
	cfg, err := LoadConfig(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	at := &apiTest{svc: svc, dir: dir, cfgPath: cfgPath, quit: make(chan struct{}, 1)}
	ctl, err := NewControl(svc, zap.NewNop(), ControlOptions{ConfigPath: cfgPath, Quit: func() { at.quit <- struct{}{} }})
	if err != nil {
		svc.Close()
		t.Fatal(err)
	}
	at.ctl = ctl
	at.base = "http://" + ctl.Addr()
	t.Cleanup(func() {
		ctl.Close()
		svc.Close()
	})
	return at
}

// pyRequests sends a request the way python-requests does for
// OpenEphysHTTPServer.send: GET without a body, or PUT with data=json.dumps(payload)
// — a str body, so no Content-Type header.
func pyRequests(t testing.TB, method, url, body string) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("User-Agent", "python-requests/2.31.0")
	req.Header.Set("Accept-Encoding", "gzip, deflate")
	req.Header.Set("Accept", "*/*")
	req.Header.Set("Connection", "keep-alive")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if ct := resp.Request.Header.Get("Content-Type"); ct != "" {
		t.Fatalf("the request carried Content-Type %q; python-tools sends none", ct)
	}
	return resp.StatusCode, data
}

// send is OpenEphysHTTPServer.send: it always ends with resp.json().
func (at *apiTest) send(t testing.TB, endpoint string, payload string) map[string]any {
	t.Helper()
	method := http.MethodGet
	if payload != "" {
		method = http.MethodPut
	}
	code, data := pyRequests(t, method, at.base+endpoint, payload)
	if code != http.StatusOK {
		t.Fatalf("%s %s %s: %d %s", method, endpoint, payload, code, data)
	}
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatalf("%s %s: resp.json() fails: %v (%s)", method, endpoint, err, data)
	}
	return m
}

// The API driven exactly as open-ephys-python-tools' OpenEphysHTTPServer
// (src/open_ephys/control/http_server.py, open-ephys/open-ephys-python-tools)
// drives the GUI: same methods, paths and bodies (json.dumps with its ", "
// and ": " separators, no Content-Type), and every answer read with
// resp.json(). Mirrored: status(), get_recording_info(), set_parent_dir(),
// set_prepend_text(), set_base_text(), set_append_text(),
// set_start_new_dir(), acquire(), record() (which reads status() first and
// returns to it after a duration), idle(), message(), get_processors(),
// config(), set_record_path() and quit() ('/api/window' {'command': 'quit'}).
// The recordings must appear with the prepend/base/append naming and Open
// Ephys's experiment/recording numbering.
func TestOpenEphysPythonToolsSession(t *testing.T) {
	at := newAPITest(t, "", "")
	mode := func(m map[string]any) string { return fmt.Sprint(m["mode"]) }

	if got := mode(at.send(t, "/api/status", "")); got != "IDLE" { // status()
		t.Fatalf("status() = %s", got)
	}
	info := at.send(t, "/api/recording", "") // get_recording_info()
	if info["default_record_engine"] != "BINARY" || len(info["record_nodes"].([]any)) != 1 {
		t.Fatalf("get_recording_info() = %v", info)
	}
	node := info["record_nodes"].([]any)[0].(map[string]any)
	nodeID := int(node["node_id"].(float64))
	if nodeID != 102 || node["record_engine"] != "BINARY" || node["is_synchronized"] != true {
		t.Fatalf("record node %v", node)
	}
	data := filepath.Join(at.dir, "data")
	at.send(t, "/api/recording", fmt.Sprintf(`{"parent_directory": %q}`, data)) // set_parent_dir(path)
	at.send(t, "/api/recording", `{"prepend_text": "mouse1_"}`)                 // set_prepend_text
	at.send(t, "/api/recording", `{"base_text": "session"}`)                    // set_base_text
	info = at.send(t, "/api/recording", `{"append_text": "_day1"}`)             // set_append_text
	if info["parent_directory"] != data || info["prepend_text"] != "mouse1_" || info["base_text"] != "session" || info["append_text"] != "_day1" {
		t.Fatalf("after the set_* calls: %v", info)
	}

	if got := mode(at.send(t, "/api/status", `{"mode": "ACQUIRE"}`)); got != "ACQUIRE" { // acquire()
		t.Fatalf("acquire() = %s", got)
	}
	// record(duration): previous_mode = status(); PUT RECORD; sleep; PUT previous_mode.
	record := func(d time.Duration, msg string) {
		t.Helper()
		prev := mode(at.send(t, "/api/status", ""))
		if got := mode(at.send(t, "/api/status", `{"mode": "RECORD"}`)); got != "RECORD" {
			t.Fatalf("record() = %s", got)
		}
		if msg != "" {
			time.Sleep(d / 2)
			at.send(t, "/api/message", fmt.Sprintf(`{"text": %q}`, msg)) // message(text)
		}
		time.Sleep(d)
		if got := mode(at.send(t, "/api/status", fmt.Sprintf(`{"mode": %q}`, prev))); got != prev {
			t.Fatalf("back to %s: %s", prev, got)
		}
	}
	record(300*time.Millisecond, "stimulus on")
	info = at.send(t, "/api/recording", "")
	if n := info["record_nodes"].([]any)[0].(map[string]any); n["experiment_number"] != 1.0 || n["recording_number"] != 1.0 {
		t.Fatalf("after the first recording: %v", n)
	}
	record(200*time.Millisecond, "")                                               // same experiment, recording 2
	if got := mode(at.send(t, "/api/status", `{"mode": "IDLE"}`)); got != "IDLE" { // idle()
		t.Fatalf("idle() = %s", got)
	}
	record(200*time.Millisecond, "") // from IDLE: experiment 2, recording 1; back to IDLE
	info = at.send(t, "/api/recording", "")
	if n := info["record_nodes"].([]any)[0].(map[string]any); n["experiment_number"] != 2.0 || n["recording_number"] != 1.0 {
		t.Fatalf("after idle/record: %v", n)
	}
	at.send(t, "/api/recording", `{"start_new_directory": "true"}`) // set_start_new_dir()
	record(200*time.Millisecond, "")

	session := filepath.Join(data, "mouse1_session_day1")
	rn := fmt.Sprintf("Record Node %d", nodeID)
	for _, p := range []string{
		filepath.Join(session, rn, "experiment1", "recording1"),
		filepath.Join(session, rn, "experiment1", "recording2"),
		filepath.Join(session, rn, "experiment2", "recording1"),
		filepath.Join(session+"_2", rn, "experiment1", "recording1"),
	} {
		if _, err := os.Stat(filepath.Join(p, "structure.oebin")); err != nil {
			all, _ := filepath.Glob(filepath.Join(data, "*", rn, "*", "*"))
			t.Fatalf("missing recording %s: %v (have %v)", p, err, all)
		}
	}
	if extra, _ := filepath.Glob(filepath.Join(session, rn, "experiment*", "recording3")); len(extra) > 0 {
		t.Fatalf("unexpected %v", extra)
	}
	text, err := os.ReadFile(filepath.Join(session, rn, "experiment1", "recording1", "events", "MessageCenter", "text.npy"))
	if err != nil || !bytes.Contains(text, []byte("stimulus on")) {
		t.Fatalf("message not recorded under events/MessageCenter: %v %q", err, text)
	}

	// set_record_path(node_id, directory)
	other := filepath.Join(at.dir, "other")
	info = at.send(t, fmt.Sprintf("/api/recording/%d", nodeID), fmt.Sprintf(`{"parent_directory": %q}`, other))
	if info["parent_directory"] != other {
		t.Fatalf("set_record_path: %v", info)
	}

	// get_processors(filter_by_name="Python Processor"), while acquiring.
	at.send(t, "/api/status", `{"mode": "ACQUIRE"}`)
	procs := at.send(t, "/api/processors", "")["processors"].([]any)
	if len(procs) != 3 {
		t.Fatalf("processors %v", procs)
	}
	src, stage, rec := procs[0].(map[string]any), procs[1].(map[string]any), procs[2].(map[string]any)
	if src["id"] != 100.0 || src["predecessor"] != nil || src["name"] != "Simulated Headstage" {
		t.Fatalf("source %v", src)
	}
	streams := src["streams"].([]any)
	if len(streams) != 1 || streams[0].(map[string]any)["channel_count"] != 4.0 || streams[0].(map[string]any)["sample_rate"] != 30000.0 {
		t.Fatalf("source streams %v", streams)
	}
	if stage["id"] != 101.0 || stage["name"] != "Python Processor" || stage["predecessor"] != 100.0 {
		t.Fatalf("stage %v", stage)
	}
	params := map[string]string{}
	for _, p := range stage["parameters"].([]any) {
		p := p.(map[string]any)
		params[p["name"].(string)] = p["value"].(string)
	}
	if params["module"] != filepath.Join(at.dir, "modules", "pass.py") || params["state"] != "running" || params["on_error"] != "continue" {
		t.Fatalf("stage parameters %v", params)
	}
	if rec["id"] != float64(nodeID) || rec["name"] != "Record Node" || rec["predecessor"] != 101.0 {
		t.Fatalf("record node %v", rec)
	}
	// config(node_id, message)
	if r := at.send(t, "/api/processors/101/config", `{"text": "reload"}`); !strings.Contains(fmt.Sprint(r["info"]), "pass.py") {
		t.Fatalf("config reload: %v", r)
	}
	lat := at.send(t, "/api/latency", "")["processors"].([]any)
	if len(lat) != 2 || lat[1].(map[string]any)["id"] != 101.0 {
		t.Fatalf("latency %v", lat)
	}
	if l := lat[1].(map[string]any)["streams"].([]any)[0].(map[string]any)["latency"].(float64); l <= 0 || l > 100 {
		t.Fatalf("stage p50 latency %v ms", l)
	}
	if u := at.send(t, "/api/cpu", "")["usage"].(float64); u < 0 || u > 1 {
		t.Fatalf("cpu usage %v", u)
	}

	// quit()
	r := at.send(t, "/api/window", `{"command": "quit"}`)
	if r["info"] == nil {
		t.Fatalf("quit answer %v", r)
	}
	select {
	case <-at.quit:
	case <-time.After(5 * time.Second):
		t.Fatal("Quit was not called")
	}
	at.send(t, "/api/quit", "{}") // the v1.0 form
	<-at.quit
}

// raw sends a request and returns the status, body and headers.
func raw(t testing.TB, method, url, body string, header map[string]string) (int, string, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, _ := http.NewRequest(method, url, rd)
	for k, v := range header {
		req.Header.Set(k, v)
		if k == "Host" {
			req.Host = v
		}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(data), resp.Header
}

// The API's errors: 404 and 400 with a reason, 405 with
// Allow, module changes limited to module_dirs, read-only parameters.
func TestAPIErrors(t *testing.T) {
	at := newAPITest(t, "", "")
	expect := func(method, path, body string, code int, contains string) string {
		t.Helper()
		got, text, _ := raw(t, method, at.base+path, body, nil)
		if got != code {
			t.Fatalf("%s %s %s: %d %q, want %d", method, path, body, got, text, code)
		}
		if code == http.StatusNotFound && text == "" {
			t.Fatalf("%s %s: 404 with an empty body, want a reason", method, path)
		}
		if !strings.Contains(text, contains) {
			t.Fatalf("%s %s %s: %q does not say %q", method, path, body, text, contains)
		}
		return text
	}
	expect("GET", "/api/processors/999", "", 404, "")
	expect("GET", "/api/processors/abc", "", 404, "")
	expect("GET", "/api/processors/101/parameters/nope", "", 404, "")
	expect("GET", "/api/nothing", "", 404, "")
	expect("PUT", "/api/recording/555", `{"parent_directory": "/tmp"}`, 404, "")
	expect("PUT", "/api/status", `{"mode": "PLAY"}`, 400, "use IDLE, ACQUIRE or RECORD")
	expect("PUT", "/api/status", `mode=ACQUIRE`, 400, "JSON object")
	expect("PUT", "/api/status", `{}`, 400, "mode")
	expect("PUT", "/api/message", `{"text": "hello"}`, 400, "not acquiring")
	expect("PUT", "/api/recording", `{"default_record_engine": "NWB2"}`, 400, "BINARY")
	expect("PUT", "/api/recording/102", `{"record_engine": "OPENEPHYS"}`, 400, "BINARY")
	expect("PUT", "/api/recording", `{"parent_directory": "relative/dir"}`, 400, "absolute")
	expect("PUT", "/api/recording", `{"prepend_text": 5}`, 400, "string")
	expect("PUT", "/api/quit", ``, 200, "Quitting")
	<-at.quit
	code, _, h := raw(t, "DELETE", at.base+"/api/status", "", nil)
	if code != http.StatusMethodNotAllowed || !strings.Contains(h.Get("Allow"), "PUT") || !strings.Contains(h.Get("Allow"), "GET") {
		t.Fatalf("DELETE /api/status: %d Allow %q", code, h.Get("Allow"))
	}
	// DNS rebinding: a loopback listener refuses foreign Host names.
	if code, text, _ := raw(t, "GET", at.base+"/api/status", "", map[string]string{"Host": "attacker.example:37497"}); code != http.StatusForbidden {
		t.Fatalf("foreign Host: %d %q", code, text)
	}
	expect("GET", "/api/ephysd/health", "", 200, "ok")

	expect("PUT", "/api/status", `{"mode": "ACQUIRE"}`, 200, "ACQUIRE")
	expect("GET", "/api/processors/101/streams/0", "", 200, `"channel_count":4`)
	expect("GET", "/api/processors/101/streams/1", "", 404, "")
	outside := filepath.Join(t.TempDir(), "evil.py")
	os.WriteFile(outside, []byte(passThrough), 0o644)
	expect("PUT", "/api/processors/101/parameters/module", fmt.Sprintf(`{"value": %q}`, outside), 400, "module_dirs")
	expect("PUT", "/api/processors/101/parameters/module", `{"value": "../../../etc/x.py"}`, 400, "module_dirs")
	expect("PUT", "/api/processors/101/parameters/module", `{}`, 400, "value")
	expect("PUT", "/api/processors/101/parameters/on_error", `{"value": "disable"}`, 400, "read-only")
	expect("PUT", "/api/processors/101/parameters/state", `{"value": "running"}`, 400, "read-only")
	expect("PUT", "/api/processors/101/parameters/bogus", `{"value": "x"}`, 404, "")
	expect("PUT", "/api/processors/101/config", `{"text": "bogus"}`, 400, "reload")
	expect("PUT", "/api/processors/102/config", `{"text": "reload"}`, 400, "no configuration messages")
	expect("PUT", "/api/window", `{"command": "minimize"}`, 400, "quit")

	// A module of the allowed folder, given relative to the current one.
	os.WriteFile(filepath.Join(at.dir, "modules", "other.py"), []byte(passThrough), 0o644)
	expect("PUT", "/api/processors/101/parameters/module", `{"value": "other.py"}`, 200, `"value":"`+filepath.Join(at.dir, "modules", "other.py"))
	// A module that raises on import: 400 with the traceback, kept for status.
	os.WriteFile(filepath.Join(at.dir, "modules", "broken.py"), []byte("x = 1 / 0\n"), 0o644)
	expect("PUT", "/api/processors/101/parameters/module", `{"value": "broken.py"}`, 400, "ZeroDivisionError")
	var st ControlStatus
	_, text, _ := raw(t, "GET", at.base+"/api/ephysd/status", "", nil)
	if err := json.Unmarshal([]byte(text), &st); err != nil {
		t.Fatal(err)
	}
	if st.LastTraceback == nil || !strings.Contains(st.LastTraceback.Text, "ZeroDivisionError") || st.Health != "ok" || st.Mode != Acquire {
		t.Fatalf("status %s", text)
	}
	if len(st.Stages) != 1 || !strings.HasSuffix(st.Stages[0].Path, "other.py") || st.Stages[0].State != "running" {
		t.Fatalf("the previous module must keep running: %+v", st.Stages)
	}
	expect("PUT", "/api/ephysd/stages/reload", ``, 200, "reloaded 1")

	// Reload: a broken file is refused with where and why; a good one applies.
	good, _ := os.ReadFile(at.cfgPath)
	os.WriteFile(at.cfgPath, append(append([]byte{}, good...), "\n[pipeline]\nblock_ms = -1\n"...), 0o644)
	expect("PUT", "/api/ephysd/reload", ``, 400, "block_ms")
	os.WriteFile(at.cfgPath, good, 0o644)
	expect("PUT", "/api/ephysd/reload", ``, 200, `"notes"`)
	expect("PUT", "/api/status", `{"mode": "IDLE"}`, 200, "IDLE")
}

// On a listener beyond loopback (allow_remote), every request needs the
// bearer token; the unix socket needs none (its permissions guard it).
func TestAPITokenOnRemoteListener(t *testing.T) {
	tokenFile := filepath.Join(t.TempDir(), "token")
	token := "0123456789abcdef0123456789abcdef"
	os.WriteFile(tokenFile, []byte(token+"\n"), 0o600)
	at := newAPITest(t, fmt.Sprintf("allow_remote = true\ntoken_file = %q\n", tokenFile), "")
	at.ctl.Close()
	at.svc.Close()
	cfg := at.svc.Config()
	cfg.Control.HTTP = "0.0.0.0:0"
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	ctl, err := NewControl(svc, zap.NewNop(), ControlOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer ctl.Close()
	_, port, _ := net.SplitHostPort(ctl.Addr())
	url := "http://127.0.0.1:" + port + "/api/status"
	for _, h := range []map[string]string{nil, {"Authorization": "Bearer wrong"}, {"Authorization": token}} {
		if code, text, hdr := raw(t, "GET", url, "", h); code != http.StatusUnauthorized || !strings.Contains(text, "token") || hdr.Get("WWW-Authenticate") == "" {
			t.Fatalf("%v: %d %q", h, code, text)
		}
	}
	if code, text, _ := raw(t, "GET", url, "", map[string]string{"Authorization": "Bearer " + token}); code != 200 || !strings.Contains(text, "IDLE") {
		t.Fatalf("with the token: %d %q", code, text)
	}
	// A remote listener accepts any Host (it is meant to be reached by name).
	if code, _, _ := raw(t, "GET", url, "", map[string]string{"Authorization": "Bearer " + token, "Host": "rig3.lab:37497"}); code != 200 {
		t.Fatalf("Host rig3.lab: %d", code)
	}
	cl, err := newClient(ctl.SocketPath())
	if err != nil {
		t.Fatal(err)
	}
	var m modeJSON
	if _, err := cl.call("GET", "/api/status", nil, &m); err != nil || m.Mode != Idle {
		t.Fatalf("over the socket: %v %v", m, err)
	}
	// A short token is refused at start.
	os.WriteFile(tokenFile, []byte("short"), 0o600)
	if _, err := NewControl(svc, zap.NewNop(), ControlOptions{}); err == nil || !strings.Contains(err.Error(), "random token") {
		t.Fatalf("short token: %v", err)
	}
}

// The socket: 0600 without a group, a stale one is replaced, a live one is
// another daemon's and refused, Close removes it.
func TestControlSocketLifecycle(t *testing.T) {
	at := newAPITest(t, "", "")
	sock := at.ctl.SocketPath()
	fi, err := os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket %v %v", fi.Mode(), err)
	}
	cfg := *at.svc.Config()
	cfg.Control.HTTP = ""
	svc2, _ := NewService(&cfg, zap.NewNop())
	defer svc2.Close()
	if _, err := NewControl(svc2, zap.NewNop(), ControlOptions{}); err == nil || !strings.Contains(err.Error(), "another ephysd is running (socket "+sock) {
		t.Fatalf("second daemon on the same socket: %v", err)
	}
	at.ctl.Close()
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after Close: %v", err)
	}
	// A stale socket (a daemon that was killed) is replaced.
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	metrics := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ephysd_up 1\n") })
	ctl2, err := NewControl(svc2, zap.NewNop(), ControlOptions{Metrics: metrics})
	if err != nil {
		t.Fatalf("stale socket: %v", err)
	}
	if ctl2.Addr() != "" {
		t.Fatalf("http = \"\" must not listen: %s", ctl2.Addr())
	}
	cl, _ := newClient(sock)
	if data, err := cl.call("GET", "/metrics", nil, nil); err != nil || string(data) != "ephysd_up 1\n" {
		t.Fatalf("/metrics: %q %v", data, err)
	}
	ctl2.Close()
	// With socket_group: 0660 and that group.
	svc2.Config().Control.SocketGroup = strconv.Itoa(os.Getgid())
	ctl3, err := NewControl(svc2, zap.NewNop(), ControlOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fi, err = os.Stat(sock)
	if err != nil || fi.Mode().Perm() != 0o660 || int(fi.Sys().(*syscall.Stat_t).Gid) != os.Getgid() {
		t.Fatalf("socket with a group: %v %v", fi.Mode(), err)
	}
	ctl3.Close()
	// A file that is not a socket is never removed.
	os.WriteFile(sock, []byte("mine"), 0o600)
	if _, err := NewControl(svc2, zap.NewNop(), ControlOptions{}); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("regular file: %v", err)
	}
}

// BenchmarkAPIStatusWhileAcquiring measures GET /api/status round trips
// (over TCP loopback, as lab scripts do, and over the CLI's unix socket)
// while a 384-channel 30 kHz simulated source runs in real time through a
// Python stage; it reports p50_us and p99_us and the pipeline's overruns.
// Run: go test ./daemon -run '^$' -bench APIStatusWhileAcquiring -benchtime 1000x
func BenchmarkAPIStatusWhileAcquiring(b *testing.B) {
	at := newAPITest(b, "", "channels = 384\nrate = 30000\nrealtime = true")
	if err := at.svc.SetMode(Acquire); err != nil {
		b.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	cl, err := newClient(at.ctl.SocketPath())
	if err != nil {
		b.Fatal(err)
	}
	tcp := &http.Client{}
	for _, tc := range []struct {
		name string
		get  func() error
	}{
		{"http", func() error {
			resp, err := tcp.Get(at.base + "/api/status")
			if err != nil {
				return err
			}
			io.Copy(io.Discard, resp.Body)
			return resp.Body.Close()
		}},
		{"unix", func() error { _, err := cl.call("GET", "/api/status", nil, nil); return err }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			before := at.svc.Status().Pipeline.Overruns
			times := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				if err := tc.get(); err != nil {
					b.Fatal(err)
				}
				times = append(times, time.Since(t0))
			}
			b.StopTimer()
			sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
			q := func(p float64) float64 {
				return float64(times[int(p*float64(len(times)-1))]) / float64(time.Microsecond)
			}
			b.ReportMetric(q(0.5), "p50_us")
			b.ReportMetric(q(0.99), "p99_us")
			b.ReportMetric(float64(at.svc.Status().Pipeline.Overruns-before), "overruns")
		})
	}
}
