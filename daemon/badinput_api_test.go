package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
)

// unixHTTP is an HTTP client of the control socket.
func unixHTTP(sock string) *http.Client {
	return &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		MaxIdleConnsPerHost: 100,
	}}
}

// do sends one request and returns the status, body and headers; a
// transport error fails the test.
func do(t testing.TB, cl *http.Client, method, url, body string, header map[string]string) (int, string, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := cl.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(data), resp.Header
}

// apiState is what a refused request must leave as it was: the mode, the
// recording naming and numbering, the stages' modules and states, and the
// folders in the recording root.
type apiState struct {
	Mode      Mode
	Recording string
	Stages    []string
	Folders   []string
}

func (at *apiTest) state(t testing.TB) apiState {
	t.Helper()
	var s apiState
	_, rec, _ := do(t, http.DefaultClient, "GET", at.base+"/api/recording", "", nil)
	s.Recording = rec
	st := at.svc.Status()
	s.Mode = st.Mode
	for _, x := range st.Stages {
		s.Stages = append(s.Stages, fmt.Sprintf("%d %s %s", x.ID, x.Path, x.State))
	}
	filepath.WalkDir(at.dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			s.Folders = append(s.Folders, p)
		}
		return nil
	})
	return s
}

// badRequestCase is one bad request, the status it must get and a text the
// answer must hold.
type badRequestCase struct {
	name, method, path, body string
	header                   map[string]string
	code                     int
	want                     string
}

// The control API's bad input, over HTTP and over the unix socket (the
// same handlers): bad JSON, JSON of the wrong shape, unknown paths, wrong
// methods, bodies and headers over the limits, message texts over the
// limit, recording names and folders that would leave the recording root.
// Each gets its status and a reason that says what to do, and changes
// nothing: the mode, the naming, the stages and the folders on disk are as
// before, and acquisition went on without an overrun.
func TestBadAPIRequests(t *testing.T) {
	at := newAPITest(t, "", "")
	if err := at.svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	recs := filepath.Join(at.dir, "recs")
	os.MkdirAll(recs, 0o755)
	aFile := filepath.Join(at.dir, "a-file")
	os.WriteFile(aFile, []byte("x"), 0o644)
	link := filepath.Join(at.dir, "link")
	outside := t.TempDir()
	os.Symlink(outside, link)
	big := strings.Repeat("x", maxBody+1)
	q := func(v string) string { b, _ := json.Marshal(v); return string(b) }

	cases := []badRequestCase{
		// Bad JSON and JSON of the wrong shape.
		{"truncated JSON", "PUT", "/api/status", `{"mode": `, nil, 400, "must be a JSON object"},
		{"not JSON", "PUT", "/api/status", `mode=ACQUIRE`, nil, 400, "must be a JSON object"},
		{"JSON array", "PUT", "/api/status", `["ACQUIRE"]`, nil, 400, "must be a JSON object"},
		{"JSON string", "PUT", "/api/status", `"ACQUIRE"`, nil, 400, "must be a JSON object"},
		{"JSON null", "PUT", "/api/status", `null`, nil, 400, "must be a JSON object"},
		{"trailing garbage", "PUT", "/api/status", `{"mode": "IDLE"} {"mode": "IDLE"}`, nil, 400, "must be a JSON object"},
		{"empty body", "PUT", "/api/status", ``, nil, 400, "must be a JSON object"},
		{"mode a number", "PUT", "/api/status", `{"mode": 1}`, nil, 400, `"mode" must be a string`},
		{"mode unknown", "PUT", "/api/status", `{"mode": "PLAY"}`, nil, 400, "use IDLE, ACQUIRE or RECORD"},
		{"mode missing", "PUT", "/api/status", `{"state": "IDLE"}`, nil, 400, `needs "mode"`},
		{"text an object", "PUT", "/api/message", `{"text": {"a": 1}}`, nil, 400, `"text" must be a string`},
		{"naming a list", "PUT", "/api/recording", `{"prepend_text": ["a"]}`, nil, 400, `"prepend_text" must be a string`},
		{"start_new_directory a number", "PUT", "/api/recording", `{"start_new_directory": 5}`, nil, 400, "start_new_directory"},
		{"value missing", "PUT", "/api/processors/101/parameters/module", `{"module": "x.py"}`, nil, 400, "must contain value"},
		{"value a number", "PUT", "/api/processors/101/parameters/module", `{"value": 7}`, nil, 400, "must be a string"},
		{"config text missing", "PUT", "/api/processors/101/config", `{}`, nil, 400, `needs "text"`},
		{"window command a bool", "PUT", "/api/window", `{"command": true}`, nil, 400, `"command" must be a string`},
		// Unknown paths: 404 with a reason.
		{"unknown path", "GET", "/api/nothing", "", nil, 404, "no endpoint /api/nothing"},
		{"unknown ephysd path", "PUT", "/api/ephysd/restart", "{}", nil, 404, "no endpoint /api/ephysd/restart"},
		{"root", "GET", "/", "", nil, 404, "/api/ephysd/"},
		{"unknown processor", "GET", "/api/processors/999", "", nil, 404, "no processor \"999\": the processors are 100, 101, 102"},
		{"processor not a number", "GET", "/api/processors/abc/parameters", "", nil, 404, "no processor \"abc\""},
		{"unknown parameter", "GET", "/api/processors/101/parameters/gain", "", nil, 404, "its parameters are module, on_error, state"},
		{"unknown stream", "GET", "/api/processors/101/streams/3", "", nil, 404, "no stream \"3\""},
		{"unknown record node", "PUT", "/api/recording/555", `{"parent_directory": "/tmp"}`, nil, 404, "record node is 102"},
		// Wrong methods: 405 with Allow.
		{"DELETE status", "DELETE", "/api/status", "", nil, 405, "use GET or PUT"},
		{"POST message", "POST", "/api/message", `{"text": "x"}`, nil, 405, "method POST is not allowed on /api/message: use PUT"},
		{"GET quit", "GET", "/api/quit", "", nil, 405, "use PUT"},
		{"PUT cpu", "PUT", "/api/cpu", "{}", nil, 405, "use GET"},
		{"PATCH reload", "PATCH", "/api/ephysd/reload", "", nil, 405, "use PUT"},
		// Sizes.
		{"huge body", "PUT", "/api/status", `{"mode": "` + big + `"}`, nil, 413, fmt.Sprintf("over %d bytes", maxBody)},
		{"huge message body", "PUT", "/api/message", `{"text": "` + big + `"}`, nil, 413, "at most 1024 bytes"},
		{"huge body on an endpoint that reads none", "PUT", "/api/quit", big, nil, 413, "small JSON objects"},
		{"huge header", "GET", "/api/status", "", map[string]string{"X-Big": strings.Repeat("h", 2*maxHeaderBytes)}, 431, ""},
		{"message over the limit", "PUT", "/api/message", `{"text": "` + strings.Repeat("m", maxMessageBytes+1) + `"}`, nil, 400, "at most 1024"},
		{"message with NUL", "PUT", "/api/message", `{"text": "a\u0000b"}`, nil, 400, "NUL"},
		// Recording names that would leave the parent folder or be no name.
		{"prepend with ..", "PUT", "/api/recording", `{"prepend_text": "../evil"}`, nil, 400, "cannot hold '/'"},
		{"base ..", "PUT", "/api/recording", `{"base_text": ".."}`, nil, 400, `cannot hold ".."`},
		{"base .", "PUT", "/api/recording", `{"base_text": "."}`, nil, 400, "is no folder name"},
		{"append with /", "PUT", "/api/recording", `{"append_text": "a/b"}`, nil, 400, "cannot hold '/'"},
		{"base with NUL", "PUT", "/api/recording", `{"base_text": "a\u0000b"}`, nil, 400, "control characters"},
		{"prepend with newline", "PUT", "/api/recording", `{"prepend_text": "a\nb"}`, nil, 400, "control characters"},
		{"name too long", "PUT", "/api/recording", `{"base_text": "` + strings.Repeat("n", 250) + `"}`, nil, 400, "at most 200"},
		{"a good part with a bad one", "PUT", "/api/recording", `{"prepend_text": "mouse1_", "append_text": "/x"}`, nil, 400, "cannot hold '/'"},
		// Parent folders outside the recording root.
		{"parent /etc", "PUT", "/api/recording", `{"parent_directory": "/etc"}`, nil, 400, "recordings may go only into " + at.dir},
		{"parent with ..", "PUT", "/api/recording", `{"parent_directory": ` + q(recs+"/../../x") + `}`, nil, 400, `".." is not allowed`},
		{"parent relative", "PUT", "/api/recording", `{"parent_directory": "recs/x"}`, nil, 400, "absolute path"},
		{"parent with NUL", "PUT", "/api/recording", `{"parent_directory": ` + q(recs+"/a\x00b") + `}`, nil, 400, "NUL"},
		{"parent a file", "PUT", "/api/recording", `{"parent_directory": ` + q(aFile) + `}`, nil, 400, "is a file"},
		{"parent through a link out", "PUT", "/api/recording", `{"parent_directory": ` + q(link+"/sub") + `}`, nil, 400, "leads through a link to " + outside},
		{"node parent /tmp", "PUT", "/api/recording/102", `{"parent_directory": "/tmp"}`, nil, 400, "recording_dirs"},
		{"node parameter parent /", "PUT", "/api/processors/102/parameters/parent_directory", `{"value": "/"}`, nil, 400, "recording_dirs"},
		{"engine", "PUT", "/api/recording", `{"default_record_engine": "NWB2"}`, nil, 400, "BINARY"},
	}
	before := at.state(t)
	blocksBefore := at.svc.Status().Pipeline.Blocks
	sock := unixHTTP(at.ctl.SocketPath())
	for _, c := range cases {
		for _, via := range []struct {
			name string
			cl   *http.Client
			base string
		}{{"http", http.DefaultClient, at.base}, {"socket", sock, "http://ephysd"}} {
			t.Run(c.name+"/"+via.name, func(t *testing.T) {
				code, text, hdr := do(t, via.cl, c.method, via.base+c.path, c.body, c.header)
				if code != c.code || !strings.Contains(text, c.want) {
					t.Fatalf("%s %s: %d %q, want %d with %q", c.method, c.path, code, text, c.code, c.want)
				}
				if code == 405 && hdr.Get("Allow") == "" {
					t.Fatalf("405 without Allow")
				}
				if code != 431 && strings.TrimSpace(text) == "" {
					t.Fatal("no reason given")
				}
			})
		}
	}
	if after := at.state(t); !reflect.DeepEqual(before, after) {
		t.Fatalf("bad requests changed the state:\nbefore %+v\nafter  %+v", before, after)
	}
	st := at.svc.Status()
	if st.Pipeline.Blocks <= blocksBefore || st.Pipeline.Overruns != 0 || st.Pipeline.Gaps != 0 {
		t.Fatalf("acquisition: %d blocks (before %d), %d overruns, %d gaps", st.Pipeline.Blocks, blocksBefore, st.Pipeline.Overruns, st.Pipeline.Gaps)
	}
	// The Allow header lists every method of the path.
	if _, _, h := do(t, http.DefaultClient, "DELETE", at.base+"/api/status", "", nil); h.Get("Allow") != "GET, PUT, HEAD" {
		t.Fatalf("Allow %q", h.Get("Allow"))
	}
	// The limits do not refuse what is within them.
	for _, c := range []badRequestCase{
		{"message of the limit", "PUT", "/api/message", `{"text": "` + strings.Repeat("m", maxMessageBytes) + `"}`, nil, 200, "ACQUIRE"},
		{"parent inside the root", "PUT", "/api/recording", `{"parent_directory": ` + q(filepath.Join(recs, "mouse7", "day3")) + `, "prepend_text": "m7_", "base_text": "a-s1.x"}`, nil, 200, "m7_"},
		{"HEAD status", "HEAD", "/api/status", "", nil, 200, ""},
	} {
		if code, text, _ := do(t, http.DefaultClient, c.method, at.base+c.path, c.body, nil); code != c.code || !strings.Contains(text, c.want) {
			t.Fatalf("%s: %d %q", c.name, code, text)
		}
	}
	if err := at.svc.SetMode(Record); err != nil {
		t.Fatal(err)
	}
	st = at.svc.Status()
	if st.Recording == nil || !strings.HasPrefix(st.Recording.Path, filepath.Join(recs, "mouse7", "day3", "m7_a-s1.x")+string(filepath.Separator)) {
		t.Fatalf("recording %+v", st.Recording)
	}
}

// The default: without recording_dirs, the API may record only into
// [recording] parent_directory (and below).
func TestBadAPIParentDefaultRoot(t *testing.T) {
	dir := t.TempDir()
	cfg, err := ParseConfig(filepath.Join(dir, "ephysd.toml"), []byte("[recording]\nparent_directory = \"data\"\n[control]\nhttp = \"\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{filepath.Join(dir, "data")}; !reflect.DeepEqual(cfg.Control.RecordingDirs, want) {
		t.Fatalf("recording_dirs %v, want %v", cfg.Control.RecordingDirs, want)
	}
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctl := &Control{svc: svc}
	for dir, want := range map[string]string{
		filepath.Join(dir, "data"):       "",
		filepath.Join(dir, "data", "m1"): "",
		filepath.Join(dir, "database"):   "may go only into",
		filepath.Join(dir, "other"):      "may go only into",
		"/":                              "may go only into",
		dir + "/data/../x":               `".."`,
	} {
		err := ctl.parentError(dir)
		if (want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), want)) {
			t.Errorf("%s: %v, want %q", dir, err, want)
		}
	}
}

// 100 clients hammer the status and control endpoints over HTTP and the
// socket while recording: every answer is what it should be, the mode stays
// RECORD, no block is lost (no overrun, no gap with a generous queue) and
// every message accepted is in the recording's MessageCenter.
func TestBadAPIHundredClients(t *testing.T) {
	at := newAPITest(t, "\n[pipeline]\nqueue_ms = 20000\n", "")
	if err := at.svc.SetMode(Record); err != nil {
		t.Fatal(err)
	}
	recPath := at.svc.Status().Recording.Path
	sock := unixHTTP(at.ctl.SocketPath())
	tcp := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 100}}
	const clients, rounds = 100, 6
	var messages, requests atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan string, clients*rounds)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			cl, base := tcp, at.base
			if i%2 == 1 {
				cl, base = sock, "http://ephysd"
			}
			for r := 0; r < rounds; r++ {
				var method, path, body, want string
				code := 200
				switch (i + r) % 8 {
				case 0:
					method, path, want = "GET", "/api/status", `"mode":"RECORD"`
				case 1:
					method, path, want = "GET", "/api/ephysd/status", `"mode":"RECORD"`
				case 2:
					method, path, body, want = "PUT", "/api/status", `{"mode": "RECORD"}`, `"mode":"RECORD"`
				case 3:
					method, path, body, want = "PUT", "/api/message", fmt.Sprintf(`{"text": "client %d round %d"}`, i, r), "RECORD"
					messages.Add(1)
				case 4:
					method, path, body, want = "PUT", "/api/recording", `{"prepend_text": "next_"}`, `"prepend_text":"next_"`
				case 5:
					method, path, want = "GET", "/api/processors", `"Python Processor"`
				case 6:
					method, path, body, code, want = "PUT", "/api/recording", `{"base_text": "../x"}`, 400, "cannot hold"
				case 7:
					method, path, body, code, want = "PUT", "/api/status", `{"mode": `, 400, "JSON object"
				}
				var rd io.Reader
				if body != "" {
					rd = strings.NewReader(body)
				}
				req, _ := http.NewRequest(method, base+path, rd)
				resp, err := cl.Do(req)
				if err != nil {
					errs <- fmt.Sprintf("client %d: %s %s: %v", i, method, path, err)
					return
				}
				data, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				requests.Add(1)
				if resp.StatusCode != code || !strings.Contains(string(data), want) {
					errs <- fmt.Sprintf("client %d: %s %s %s: %d %q, want %d %q", i, method, path, body, resp.StatusCode, data, code, want)
				}
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if t.Failed() {
		return
	}
	// Messages attach to the next block read: wait for a few more blocks
	// before stopping (a count, with a generous hang guard).
	b0 := at.svc.Status().Pipeline.Blocks
	for deadline := time.Now().Add(time.Minute); at.svc.Status().Pipeline.Blocks < b0+10; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no blocks flow")
		}
	}
	st := at.svc.Status()
	if st.Mode != Record || st.Pipeline.Overruns != 0 || st.Pipeline.Gaps != 0 {
		t.Fatalf("after %d requests: mode %s, %d overruns, %d gaps", requests.Load(), st.Mode, st.Pipeline.Overruns, st.Pipeline.Gaps)
	}
	if err := at.svc.SetMode(Idle); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("/usr/bin/python3", "-I", "-c",
		"import sys, numpy; print(len(numpy.load(sys.argv[1])))", filepath.Join(recPath, "events", "MessageCenter", "text.npy")).CombinedOutput()
	if err != nil {
		t.Fatalf("reading text.npy: %v %s", err, out)
	}
	if n, _ := strconv.Atoi(strings.TrimSpace(string(out))); int64(n) != messages.Load() {
		t.Fatalf("text.npy holds %d messages, %d were accepted", n, messages.Load())
	}
	t.Logf("%d requests from %d clients; %d messages recorded; 0 overruns, 0 gaps", requests.Load(), clients, messages.Load())
}

// Security defaults: the HTTP API listens on loopback unless the file says
// otherwise (and then needs allow_remote and a token: the configuration
// cases above), and the control socket goes only into a folder no other
// user can write to or owns.
func TestSecurityListenDefaultsAndSocketFolder(t *testing.T) {
	cfg, err := ParseConfig(filepath.Join(t.TempDir(), "(built-in defaults)"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !loopbackAddr(cfg.Control.HTTP) || cfg.Control.AllowRemote || cfg.Control.SocketGroup != "" {
		t.Fatalf("defaults: http %q allow_remote %v socket_group %q", cfg.Control.HTTP, cfg.Control.AllowRemote, cfg.Control.SocketGroup)
	}
	for addr, ok := range map[string]bool{"127.0.0.1:37497": true, "localhost:1": true, "[::1]:37497": true, "0.0.0.0:37497": false, ":37497": false, "[::]:37497": false, "192.168.1.5:37497": false} {
		if loopbackAddr(addr) != ok {
			t.Errorf("loopbackAddr(%q) = %v", addr, !ok)
		}
	}

	base, err := os.MkdirTemp("", "ephysd-sock")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(base)
	cfg.Control.HTTP = ""
	svc, err := NewService(cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	try := func(dir string) error {
		cfg.Control.Socket = filepath.Join(dir, "control.sock")
		ctl, err := NewControl(svc, zap.NewNop(), ControlOptions{})
		if err == nil {
			ctl.Close()
		}
		return err
	}
	open := filepath.Join(base, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	if err := try(open); err == nil || !strings.Contains(err.Error(), "is writable by other users (mode 0777): chmod go-w it") {
		t.Fatalf("a folder anyone may write to: %v", err)
	}
	theirs := filepath.Join(base, "theirs")
	os.Mkdir(theirs, 0o755)
	if os.Geteuid() == 0 {
		os.Chown(theirs, 65534, 65534)
		if err := try(theirs); err == nil || !strings.Contains(err.Error(), "belongs to user id 65534") {
			t.Fatalf("another user's folder: %v", err)
		}
	}
	sticky := filepath.Join(base, "sticky")
	os.Mkdir(sticky, 0o777)
	os.Chmod(sticky, 0o777|os.ModeSticky)
	if err := try(sticky); err != nil {
		t.Fatalf("a sticky folder like /tmp: %v", err)
	}
	fresh := filepath.Join(base, "new", "ephysd")
	if err := try(fresh); err != nil {
		t.Fatalf("a folder ephysd makes: %v", err)
	}
	if fi, err := os.Stat(fresh); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("the folder ephysd made: %v %v", fi.Mode(), err)
	}
}
