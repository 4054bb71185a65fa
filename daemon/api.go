package daemon

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
	"github.com/ephysd/ephysd/recording"
)

// ControlOptions are what the control API needs beyond the service.
type ControlOptions struct {
	// ConfigPath is the configuration file that PUT /api/ephysd/reload
	// reads again ("" re-applies the configuration in force).
	ConfigPath string
	// Metrics, if set, is served at /metrics.
	Metrics http.Handler
	// Quit, if set, is called (on its own goroutine, after the answer has
	// been written) by PUT /api/quit and PUT /api/window {"command": "quit"}.
	Quit func()
}

// Control is ephysd's control API: the Open Ephys GUI's remote-control HTTP
// API (so lab scripts written for the GUI work unchanged) plus ephysd's own
// endpoints under /api/ephysd/. The same handler answers on the HTTP address
// of [control] http and on the unix socket of the ephysd CLI.
type Control struct {
	svc  *Service
	log  *zap.Logger
	opts ControlOptions

	handler http.Handler

	httpLn   net.Listener
	httpSrv  *http.Server
	sockLn   net.Listener
	sockSrv  *http.Server
	sockPath string
	token    string // "" when the HTTP listener needs none

	cpu *cpuSampler

	mu       sync.Mutex
	lastInfo *pipeline.StreamInfo // the stream of the last acquisition
	lastTB   *Traceback           // the last full traceback an API load returned

	closeOnce sync.Once
	wg        sync.WaitGroup
}

// Traceback is a Python traceback kept for `ephysd status`.
type Traceback struct {
	Stage string    `json:"stage"`
	Text  string    `json:"text"`
	At    time.Time `json:"at"`
}

// NewControl starts the control API: HTTP on svc.Config().Control.HTTP
// (unless ""), and the unix socket of the CLI (Control.Socket, or the
// default DefaultSocketPath). A socket file that nothing answers on is
// removed; one that answers means another ephysd runs, which is an error.
func NewControl(svc *Service, log *zap.Logger, opts ControlOptions) (*Control, error) {
	if log == nil {
		log = zap.NewNop()
	}
	cfg := svc.Config().Control
	c := &Control{svc: svc, log: log.Named("control"), opts: opts}
	c.handler = c.routes()

	if cfg.HTTP != "" {
		// Check the HTTP settings and read the token before touching the
		// socket.
		if err := c.readToken(cfg); err != nil {
			return nil, err
		}
	}
	sockPath := cfg.Socket
	if sockPath == "" {
		sockPath = DefaultSocketPath()
	}
	ln, err := listenSocket(sockPath, cfg.SocketGroup)
	if err != nil {
		return nil, err
	}
	c.sockLn, c.sockPath = ln, sockPath
	c.sockSrv = &http.Server{
		Handler:           c.handler,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       readTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		IdleTimeout:       2 * time.Minute,
		ConnContext:       unixPeerContext,
		ErrorLog:          zap.NewStdLog(c.log),
	}

	if cfg.HTTP != "" {
		if err := c.listenHTTP(cfg); err != nil {
			ln.Close()
			return nil, err
		}
	}
	c.cpu = newCPUSampler()
	c.serve(c.sockSrv, c.sockLn)
	if c.httpSrv != nil {
		c.serve(c.httpSrv, c.httpLn)
	}
	fields := []zap.Field{zap.String("socket", c.sockPath)}
	if c.httpLn != nil {
		fields = append(fields, zap.String("http", c.httpLn.Addr().String()), zap.Bool("token_required", c.token != ""))
	}
	c.log.Info("control API listening", fields...)
	return c, nil
}

// readToken checks the HTTP address against allow_remote and reads the
// bearer token that a listener beyond loopback requires.
func (c *Control) readToken(cfg ControlConfig) error {
	if !loopbackAddr(cfg.HTTP) && !cfg.AllowRemote {
		return fmt.Errorf("control: http = %q is not a loopback address: set [control] allow_remote = true and token_file to listen beyond this machine", cfg.HTTP)
	}
	if cfg.AllowRemote {
		if cfg.TokenFile == "" {
			return errors.New("control: allow_remote needs token_file: clients beyond loopback must present a bearer token")
		}
		data, err := os.ReadFile(cfg.TokenFile)
		if err != nil {
			return fmt.Errorf("control: token_file: %w (make it readable by the service user)", err)
		}
		c.token = strings.TrimSpace(string(data))
		if len(c.token) < 16 {
			return fmt.Errorf("control: token_file %s holds %d characters: put a long random token in it (openssl rand -hex 32 > %s)", cfg.TokenFile, len(c.token), cfg.TokenFile)
		}
		if fi, err := os.Stat(cfg.TokenFile); err == nil && fi.Mode().Perm()&0o007 != 0 {
			c.log.Warn("the token file is readable by every user: chmod o-rwx it", zap.String("token_file", cfg.TokenFile))
		}
	}
	return nil
}

func (c *Control) listenHTTP(cfg ControlConfig) error {
	loopback := loopbackAddr(cfg.HTTP)
	ln, err := net.Listen("tcp", cfg.HTTP)
	if err != nil {
		hint := ""
		if errors.Is(err, syscall.EADDRINUSE) {
			hint = " — another ephysd or the Open Ephys GUI may be listening there; stop it or change [control] http"
		}
		return fmt.Errorf("control: listen on %s: %w%s", cfg.HTTP, err, hint)
	}
	c.httpLn = ln
	c.httpSrv = &http.Server{
		Handler:           c.guard(c.handler, loopback && !cfg.AllowRemote),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       readTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          zap.NewStdLog(c.log),
	}
	return nil
}

func (c *Control) serve(srv *http.Server, ln net.Listener) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			c.log.Error("control API stopped serving", zap.String("listener", ln.Addr().String()), zap.Error(err))
		}
	}()
}

// Addr is the HTTP API's address (with the port chosen when it was 0), or
// "" when HTTP is off.
func (c *Control) Addr() string {
	if c.httpLn == nil {
		return ""
	}
	return c.httpLn.Addr().String()
}

// SocketPath is the unix socket the CLI talks to.
func (c *Control) SocketPath() string { return c.sockPath }

// Handler is the API's handler (the one both listeners serve, without the
// HTTP listener's host and token checks).
func (c *Control) Handler() http.Handler { return c.handler }

// Close stops both listeners, lets requests in progress finish (up to 5 s)
// and removes the socket file.
func (c *Control) Close() error {
	var errs []error
	c.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, srv := range []*http.Server{c.httpSrv, c.sockSrv} {
			if srv == nil {
				continue
			}
			if err := srv.Shutdown(ctx); err != nil {
				errs = append(errs, err)
				srv.Close()
			}
		}
		c.wg.Wait()
		c.cpu.stop()
	})
	return errors.Join(errs...)
}

// DefaultSocketPath is where the control socket goes when [control] socket
// is not set: $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), else
// $XDG_RUNTIME_DIR/ephysd, else /tmp/ephysd-<uid>; file control.sock.
func DefaultSocketPath() string {
	return filepath.Join(defaultSocketDir(), "control.sock")
}

func defaultSocketDir() string {
	if d := os.Getenv("RUNTIME_DIRECTORY"); d != "" {
		if i := strings.IndexByte(d, ':'); i >= 0 { // several RuntimeDirectory= entries
			d = d[:i]
		}
		return d
	}
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "ephysd")
	}
	return fmt.Sprintf("/tmp/ephysd-%d", os.Getuid())
}

// listenSocket makes the control socket: its folder (0750 with a group,
// else 0700) if missing, a stale socket file removed, then 0660 owned by
// group, or 0600.
func listenSocket(path, group string) (net.Listener, error) {
	gid := -1
	if group != "" {
		g, err := lookupGroup(group)
		if err != nil {
			return nil, fmt.Errorf("control: socket_group %q: %w (create it with groupadd, or leave socket_group out)", group, err)
		}
		gid = g
	}
	dir := filepath.Dir(path)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		mode := os.FileMode(0o700)
		if gid >= 0 {
			mode = 0o750
		}
		if err := os.MkdirAll(dir, mode); err != nil {
			return nil, fmt.Errorf("control: create the socket folder %s: %w (set [control] socket to a writable place)", dir, err)
		}
		os.Chmod(dir, mode) // MkdirAll applies the umask
		if gid >= 0 {
			if err := os.Chown(dir, -1, gid); err != nil {
				return nil, fmt.Errorf("control: give the socket folder %s to group %s: %w", dir, group, err)
			}
		}
	}
	if err := checkSocketDir(dir); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("control: %s exists and is not a socket: remove it or set [control] socket elsewhere", path)
		}
		conn, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			conn.Close()
			return nil, fmt.Errorf("control: another ephysd is running (socket %s answers): stop it first, or give this one another [control] socket and http", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("control: remove the stale socket %s: %w", path, err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control: listen on %s: %w (set [control] socket to a writable place)", path, err)
	}
	mode := os.FileMode(0o600)
	if gid >= 0 {
		mode = 0o660
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("control: give the socket %s to group %s: %w (the service user must be a member of it)", path, group, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control: chmod the socket %s: %w", path, err)
	}
	return ln, nil
}

// checkSocketDir refuses a socket folder another user could use to swap
// the socket for theirs (and so read the CLI's commands or answer them): it
// must belong to this user or root, and must not be writable by others
// unless sticky (like /tmp, where only a file's owner may remove it). A
// default folder such as /tmp/ephysd-<uid> that someone else made first is
// refused rather than used.
func checkSocketDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("control: the socket folder %s: %w", dir, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	if int(st.Uid) != os.Geteuid() && st.Uid != 0 {
		return fmt.Errorf("control: the socket folder %s belongs to user id %d, not to the user ephysd runs as (%d): remove it, or set [control] socket to a folder of this user", dir, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0 {
		return fmt.Errorf("control: the socket folder %s is writable by other users (mode %#o): chmod go-w it, or set [control] socket elsewhere", dir, fi.Mode().Perm())
	}
	return nil
}

func lookupGroup(name string) (int, error) {
	if n, err := strconv.Atoi(name); err == nil {
		return n, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}

// peerKey is the context key of a request's peer description.
type peerKey struct{}

// unixPeerContext records who is on the other side of the socket (uid and
// pid from SO_PEERCRED) for the logs.
func unixPeerContext(ctx context.Context, conn net.Conn) context.Context {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *syscall.Ucred
	raw.Control(func(fd uintptr) {
		cred, _ = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	if cred == nil {
		return context.WithValue(ctx, peerKey{}, "unix socket")
	}
	who := strconv.Itoa(int(cred.Uid))
	if u, err := user.LookupId(who); err == nil {
		who = u.Username
	}
	return context.WithValue(ctx, peerKey{}, fmt.Sprintf("unix socket (user %s, pid %d)", who, cred.Pid))
}

// remote describes who sent r, for the logs.
func remote(r *http.Request) string {
	if p, ok := r.Context().Value(peerKey{}).(string); ok {
		return p
	}
	return r.RemoteAddr
}

// guard is the HTTP listener's gate: with a token, every request must carry
// it; on a loopback-only listener, the Host must be a loopback name or an
// address, so that a web page cannot reach the API through DNS rebinding.
func (c *Control) guard(next http.Handler, loopbackOnly bool) http.Handler {
	want := sha256.Sum256([]byte(c.token))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c.token != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			sum := sha256.Sum256([]byte(strings.TrimSpace(got)))
			if !ok || subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
				c.log.Warn("control request refused: missing or wrong bearer token", zap.String("remote", r.RemoteAddr), zap.String("path", r.URL.Path))
				w.Header().Set("WWW-Authenticate", `Bearer realm="ephysd"`)
				http.Error(w, "missing or wrong bearer token: send the header Authorization: Bearer <the token in [control] token_file>", http.StatusUnauthorized)
				return
			}
		}
		if loopbackOnly && !loopbackHost(r.Host) {
			http.Error(w, fmt.Sprintf("Host %q refused: this API listens on loopback only; connect to 127.0.0.1 or localhost", r.Host), http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func loopbackHost(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.Trim(host, "[]"), ".")
	if host == "" || strings.EqualFold(host, "localhost") || strings.HasSuffix(strings.ToLower(host), ".localhost") {
		return true
	}
	return net.ParseIP(host) != nil
}

func (c *Control) routes() http.Handler {
	mux := http.NewServeMux()
	// The Open Ephys GUI's API.
	mux.HandleFunc("GET /api/status", c.getStatus)
	mux.HandleFunc("PUT /api/status", c.putStatus)
	mux.HandleFunc("GET /api/recording", c.getRecording)
	mux.HandleFunc("PUT /api/recording", c.putRecording)
	mux.HandleFunc("PUT /api/recording/{node}", c.putRecordNode)
	mux.HandleFunc("PUT /api/message", c.putMessage)
	mux.HandleFunc("GET /api/processors", c.getProcessors)
	mux.HandleFunc("GET /api/processors/{id}", c.getProcessor)
	mux.HandleFunc("GET /api/processors/{id}/parameters", c.getParameters)
	mux.HandleFunc("GET /api/processors/{id}/parameters/{name}", c.getParameter)
	mux.HandleFunc("PUT /api/processors/{id}/parameters/{name}", c.putParameter)
	mux.HandleFunc("GET /api/processors/{id}/streams/{stream}", c.getStream)
	mux.HandleFunc("GET /api/processors/{id}/streams/{stream}/parameters", c.getParameters)
	mux.HandleFunc("GET /api/processors/{id}/streams/{stream}/parameters/{name}", c.getParameter)
	mux.HandleFunc("PUT /api/processors/{id}/streams/{stream}/parameters/{name}", c.putParameter)
	mux.HandleFunc("PUT /api/processors/{id}/config", c.putConfig)
	mux.HandleFunc("GET /api/cpu", c.getCPU)
	mux.HandleFunc("GET /api/latency", c.getLatency)
	mux.HandleFunc("PUT /api/quit", c.putQuit)
	mux.HandleFunc("PUT /api/window", c.putWindow)
	// ephysd's own.
	mux.HandleFunc("GET /api/ephysd/status", c.getEphysdStatus)
	mux.HandleFunc("PUT /api/ephysd/reload", c.putReload)
	mux.HandleFunc("PUT /api/ephysd/stages/reload", c.putStagesReload)
	mux.HandleFunc("GET /api/ephysd/health", c.getHealth)
	if c.opts.Metrics != nil {
		mux.Handle("/metrics", c.opts.Metrics)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Every handler reads at most maxBody bytes of the body; a body
		// declared larger is refused before any handler runs.
		if r.ContentLength > maxBody {
			tooLarge(w)
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, maxBody)
		if _, pattern := mux.Handler(r); pattern == "" {
			noRoute(w, r, mux)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// apiMethods are the methods tried for the Allow header of a 405.
var apiMethods = []string{http.MethodGet, http.MethodPut, http.MethodPost, http.MethodDelete, http.MethodPatch}

// noRoute answers a request no route takes: 405 with Allow when the path
// exists for other methods, else 404; both with a plain-text reason (the
// GUI's 404s have an empty body, which no client relies on).
func noRoute(w http.ResponseWriter, r *http.Request, mux *http.ServeMux) {
	var allow []string
	for _, m := range apiMethods {
		r2 := r.Clone(r.Context())
		r2.Method = m
		if _, p := mux.Handler(r2); p != "" {
			allow = append(allow, m)
		}
	}
	if len(allow) > 0 {
		if slices.Contains(allow, http.MethodGet) {
			allow = append(allow, http.MethodHead)
		}
		w.Header().Set("Allow", strings.Join(allow, ", "))
		http.Error(w, fmt.Sprintf("method %s is not allowed on %s: use %s", r.Method, r.URL.Path, strings.Join(allow, " or ")), http.StatusMethodNotAllowed)
		return
	}
	notFound(w, "no endpoint %s: ephysd answers the Open Ephys API under /api/ (status, recording, message, processors, cpu, latency, quit, window) and its own under /api/ephysd/ (status, health, reload, stages/reload); see README.md, Control from scripts", r.URL.Path)
}

// Limits of a request: its body (every request of the API is a small JSON
// object: a larger body is refused with 413), its header, the time to read
// it, and the text of a message (PUT /api/message).
const (
	maxBody         = 64 << 10
	maxHeaderBytes  = 64 << 10
	readTimeout     = 30 * time.Second
	maxMessageBytes = 1024
	// maxNameBytes bounds prepend_text + base_text + append_text: the
	// session folder's name (with the date for an empty base_text and a
	// _N suffix) must fit a file name's 255 bytes.
	maxNameBytes = 200
)

func writeJSON(w http.ResponseWriter, v any) {
	data, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "encoding the answer: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(data)
}

// badRequest answers 400 with a plain-text reason, as the GUI does.
func badRequest(w http.ResponseWriter, format string, args ...any) {
	http.Error(w, fmt.Sprintf(format, args...), http.StatusBadRequest)
}

// tooLarge answers 413 for a body over maxBody.
func tooLarge(w http.ResponseWriter) {
	http.Error(w, fmt.Sprintf("request body over %d bytes refused: the API's requests are small JSON objects, e.g. {\"text\": \"…\"} (a message holds at most %d bytes)", maxBody, maxMessageBytes), http.StatusRequestEntityTooLarge)
}

// notFound answers 404 with a plain-text reason.
func notFound(w http.ResponseWriter, format string, args ...any) {
	http.Error(w, fmt.Sprintf(format, args...), http.StatusNotFound)
}

// readBody parses a PUT body as a JSON object whatever its Content-Type
// (the GUI's clients send none).
func readBody(w http.ResponseWriter, r *http.Request) (map[string]json.RawMessage, bool) {
	data, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		if mb := (*http.MaxBytesError)(nil); errors.As(err, &mb) {
			tooLarge(w)
			return nil, false
		}
		badRequest(w, "reading the request body: %v", err)
		return nil, false
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil || m == nil {
		if err == nil {
			err = errors.New("null")
		}
		badRequest(w, "the request body must be a JSON object, e.g. {\"mode\": \"ACQUIRE\"}: %v", err)
		return nil, false
	}
	return m, true
}

// stringField reads key from a body: present reports whether it was there.
func stringField(w http.ResponseWriter, m map[string]json.RawMessage, key string) (value string, present, ok bool) {
	raw, found := m[key]
	if !found {
		return "", false, true
	}
	if err := json.Unmarshal(raw, &value); err != nil {
		badRequest(w, "%q must be a string, not %s", key, raw)
		return "", true, false
	}
	return value, true, true
}

// --- status ---

type modeJSON struct {
	Mode Mode `json:"mode"`
}

func (c *Control) getStatus(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, modeJSON{c.svc.Mode()})
}

func (c *Control) putStatus(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	s, present, ok := stringField(w, body, "mode")
	if !ok {
		return
	}
	if !present {
		badRequest(w, "the request needs \"mode\": IDLE, ACQUIRE or RECORD")
		return
	}
	m, err := ParseMode(s)
	if err != nil {
		badRequest(w, "%v", err)
		return
	}
	from := c.svc.Mode()
	start := time.Now()
	if err := c.svc.SetMode(m); err != nil {
		c.log.Error("control: mode change failed", zap.String("from", string(from)), zap.String("to", string(m)),
			zap.String("remote", remote(r)), zap.Error(err))
		http.Error(w, fmt.Sprintf("%s → %s failed: %v", from, m, err), http.StatusInternalServerError)
		return
	}
	c.noteInfo()
	now := c.svc.Mode()
	if now != from {
		c.log.Info("control: mode changed", zap.String("from", string(from)), zap.String("to", string(now)),
			zap.String("remote", remote(r)), zap.Duration("took", time.Since(start)))
	}
	writeJSON(w, modeJSON{now})
}

// noteInfo remembers the stream of the running acquisition, so that the
// processors keep their streams once IDLE.
func (c *Control) noteInfo() *pipeline.StreamInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ch := c.svc.Chain(); ch != nil {
		info := ch.Info
		c.lastInfo = &info
	}
	return c.lastInfo
}

// --- recording ---

// BinaryEngine is the only record engine: the Open Ephys binary format.
const BinaryEngine = "BINARY"

type recordNodeJSON struct {
	NodeID           int    `json:"node_id"`
	ParentDirectory  string `json:"parent_directory"`
	RecordEngine     string `json:"record_engine"`
	ExperimentNumber int    `json:"experiment_number"`
	RecordingNumber  int    `json:"recording_number"`
	IsSynchronized   bool   `json:"is_synchronized"`
}

type recordingJSON struct {
	ParentDirectory     string           `json:"parent_directory"`
	BaseText            string           `json:"base_text"`
	PrependText         string           `json:"prepend_text"`
	AppendText          string           `json:"append_text"`
	DefaultRecordEngine string           `json:"default_record_engine"`
	RecordNodes         []recordNodeJSON `json:"record_nodes"`
}

func (c *Control) recordingInfo() recordingJSON {
	sess := c.svc.Session()
	n := sess.Naming()
	exp, rec := c.numbers()
	return recordingJSON{
		ParentDirectory: n.Parent, BaseText: n.Base, PrependText: n.Prepend, AppendText: n.Append,
		DefaultRecordEngine: BinaryEngine,
		RecordNodes: []recordNodeJSON{{
			NodeID: sess.RecordNodeID(), ParentDirectory: n.Parent, RecordEngine: BinaryEngine,
			ExperimentNumber: exp, RecordingNumber: rec, IsSynchronized: true,
		}},
	}
}

// numbers are the experiment and recording numbers of the recording in
// progress, else of the last one in the session folder (0, 0 before the
// first record start in a folder).
func (c *Control) numbers() (experiment, rec int) {
	if st := c.svc.Status(); st.Recording != nil {
		return st.Recording.Experiment, st.Recording.Number
	}
	sess := c.svc.Session()
	dir := sess.Dir()
	if dir == "" {
		return 0, 0
	}
	node := filepath.Join(dir, "Record Node "+strconv.Itoa(sess.RecordNodeID()))
	exps, _ := filepath.Glob(filepath.Join(node, "experiment*"))
	for _, e := range exps {
		n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(e), "experiment"))
		if err == nil && n > experiment {
			experiment, rec = n, 0
		}
	}
	if experiment == 0 {
		return 0, 0
	}
	recs, _ := filepath.Glob(filepath.Join(node, "experiment"+strconv.Itoa(experiment), "recording*"))
	for _, p := range recs {
		if n, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(p), "recording")); err == nil && n > rec {
			rec = n
		}
	}
	return experiment, rec
}

func (c *Control) getRecording(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, c.recordingInfo())
}

func checkEngine(w http.ResponseWriter, engine string) bool {
	if !strings.EqualFold(engine, BinaryEngine) {
		badRequest(w, "record engine %q is not supported: ephysd writes the Open Ephys binary format only (%s)", engine, BinaryEngine)
		return false
	}
	return true
}

// checkParent refuses a parent_directory that is not an absolute path, has
// a NUL or a ".." element, is a file, or lies outside the folders the API
// may record into ([control] recording_dirs, by default [recording]
// parent_directory), also through a symbolic link.
func (c *Control) checkParent(w http.ResponseWriter, dir string) bool {
	if err := c.parentError(dir); err != nil {
		badRequest(w, "parent_directory %q: %v", dir, err)
		return false
	}
	return true
}

func (c *Control) parentError(dir string) error {
	dirs := c.svc.Config().Control.RecordingDirs
	switch {
	case strings.IndexByte(dir, 0) >= 0:
		return errors.New("holds a NUL character")
	case !filepath.IsAbs(dir):
		return errors.New("give an absolute path")
	case slices.Contains(strings.Split(dir, "/"), ".."):
		return errors.New(`".." is not allowed in it: give the folder's own path`)
	case !withinDirs(dir, dirs):
		return fmt.Errorf("recordings may go only into %s (or a folder below): add the folder to [control] recording_dirs to allow it", strings.Join(dirs, ", "))
	}
	if fi, err := os.Stat(dir); err == nil && !fi.IsDir() {
		return errors.New("is a file, not a folder")
	}
	// The part of the path that exists, with its links followed, must stay
	// inside too.
	existing := filepath.Clean(dir)
	for {
		if _, err := os.Lstat(existing); err == nil || existing == "/" {
			break
		}
		existing = filepath.Dir(existing)
	}
	rest, _ := filepath.Rel(existing, filepath.Clean(dir))
	if real, err := filepath.EvalSymlinks(existing); err == nil && !withinDirs(filepath.Join(real, rest), realDirs(dirs)) {
		return fmt.Errorf("%s leads through a link to %s, outside the folders recordings may go into (%s)", dir, filepath.Join(real, rest), strings.Join(dirs, ", "))
	}
	return nil
}

// checkNamePart refuses a prepend_text, base_text or append_text that
// could make the session folder's name leave the parent folder or be no
// file name: a '/', a NUL or other control character, or "..".
func checkNamePart(key, v string) error {
	for _, r := range v {
		if r == '/' || r < 0x20 || r == 0x7f {
			return fmt.Errorf("%s %q: a folder name part cannot hold '/' or control characters (NUL, newline…)", key, v)
		}
	}
	if strings.Contains(v, "..") {
		return fmt.Errorf("%s %q: a folder name part cannot hold \"..\"", key, v)
	}
	return nil
}

// checkFolderName refuses naming whose session folder name would be "." or
// too long for a file name.
func checkFolderName(n recording.Naming) error {
	name := n.Prepend + n.Base + n.Append
	if n.Base == "" {
		name = n.Prepend + "YYYY-MM-DD_HH-MM-SS" + n.Append
	}
	if name == "." || name == "" {
		return fmt.Errorf("prepend_text + base_text + append_text = %q is no folder name", name)
	}
	if len(name) > maxNameBytes {
		return fmt.Errorf("prepend_text + base_text + append_text make a folder name of %d bytes: at most %d", len(name), maxNameBytes)
	}
	return nil
}

// checkModulePath refuses a module path that has a NUL, lies outside
// [control] module_dirs (also through a symbolic link), or is no readable
// regular file — before the stage is asked to load it.
func (c *Control) checkModulePath(path string) error {
	if strings.IndexByte(path, 0) >= 0 {
		return fmt.Errorf("module %q holds a NUL character", path)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	dirs := c.svc.Config().Control.ModuleDirs
	if !withinDirs(abs, dirs) {
		return fmt.Errorf("module %s is outside the folders modules may be loaded from (%s): add its folder to [control] module_dirs", abs, strings.Join(dirs, ", "))
	}
	if err := checkModuleFile(abs); err != nil {
		return fmt.Errorf("module %w", err)
	}
	if real, err := filepath.EvalSymlinks(abs); err == nil && !withinDirs(real, realDirs(dirs)) {
		return fmt.Errorf("module %s is a link to %s, outside the folders modules may be loaded from (%s)", abs, real, strings.Join(dirs, ", "))
	}
	return nil
}

func (c *Control) putRecording(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	sess := c.svc.Session()
	n := sess.Naming()
	changed := false
	for _, f := range []struct {
		key string
		dst *string
	}{{"parent_directory", &n.Parent}, {"prepend_text", &n.Prepend}, {"base_text", &n.Base}, {"append_text", &n.Append}} {
		v, present, ok := stringField(w, body, f.key)
		if !ok {
			return
		}
		if !present {
			continue
		}
		if f.key == "parent_directory" {
			if v == "" {
				continue
			}
			if !c.checkParent(w, v) {
				return
			}
			v = filepath.Clean(v)
		} else if err := checkNamePart(f.key, v); err != nil {
			badRequest(w, "%v", err)
			return
		}
		*f.dst = v
		changed = true
	}
	if v, present, ok := stringField(w, body, "default_record_engine"); !ok {
		return
	} else if present && !checkEngine(w, v) {
		return
	}
	newDir := false
	if raw, present := body["start_new_directory"]; present {
		var s string
		var b bool
		switch {
		case json.Unmarshal(raw, &s) == nil:
			newDir = s == "true"
		case json.Unmarshal(raw, &b) == nil:
			newDir = b
		default:
			badRequest(w, "start_new_directory must be \"true\", not %s", raw)
			return
		}
	}
	if err := checkFolderName(n); changed && err != nil {
		badRequest(w, "%v", err)
		return
	}
	if changed {
		sess.SetNaming(n)
		c.log.Info("control: recording naming set", zap.String("parent_directory", n.Parent), zap.String("prepend_text", n.Prepend),
			zap.String("base_text", n.Base), zap.String("append_text", n.Append), zap.String("remote", remote(r)))
	}
	if newDir {
		sess.StartNewDirectory()
		c.log.Info("control: the next recording starts a new folder", zap.String("remote", remote(r)))
	}
	writeJSON(w, c.recordingInfo())
}

func (c *Control) putRecordNode(w http.ResponseWriter, r *http.Request) {
	id, err := strconv.Atoi(r.PathValue("node"))
	if err != nil || id != c.svc.Session().RecordNodeID() {
		notFound(w, "no record node %q: ephysd's record node is %d", r.PathValue("node"), c.svc.Session().RecordNodeID())
		return
	}
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	dir, present, ok := stringField(w, body, "parent_directory")
	if !ok {
		return
	}
	if v, has, ok := stringField(w, body, "record_engine"); !ok {
		return
	} else if has && !checkEngine(w, v) {
		return
	}
	if present && dir != "" {
		if !c.checkParent(w, dir) {
			return
		}
		c.setParent(r, filepath.Clean(dir))
	}
	writeJSON(w, c.recordingInfo())
}

func (c *Control) setParent(r *http.Request, dir string) {
	sess := c.svc.Session()
	n := sess.Naming()
	n.Parent = dir
	sess.SetNaming(n)
	c.log.Info("control: recording parent directory set", zap.String("parent_directory", dir), zap.String("remote", remote(r)))
}

// --- message ---

func (c *Control) putMessage(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	text, present, ok := stringField(w, body, "text")
	if !ok {
		return
	}
	if !present {
		badRequest(w, "the request needs \"text\"")
		return
	}
	if len(text) > maxMessageBytes {
		badRequest(w, "the message text is %d bytes: at most %d (messages are short notes stamped with a sample number)", len(text), maxMessageBytes)
		return
	}
	if strings.IndexByte(text, 0) >= 0 {
		badRequest(w, "the message text holds a NUL character, which text.npy cannot keep")
		return
	}
	if err := c.svc.Message(text); err != nil {
		badRequest(w, "%v", err)
		return
	}
	c.log.Info("control: message", zap.String("text", text), zap.String("remote", remote(r)))
	writeJSON(w, modeJSON{c.svc.Mode()})
}

// --- processors ---

type parameterJSON struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	Value string `json:"value"` // a string, as the GUI gives every value
}

type streamJSON struct {
	Name         string          `json:"name"`
	SourceID     int             `json:"source_id"`
	SampleRate   float64         `json:"sample_rate"`
	ChannelCount int             `json:"channel_count"`
	Parameters   []parameterJSON `json:"parameters"`
}

type processorJSON struct {
	ID          int             `json:"id"`
	Name        string          `json:"name"`
	Parameters  []parameterJSON `json:"parameters"`
	Predecessor *int            `json:"predecessor"`
	Streams     []streamJSON    `json:"streams"`
}

type procKind int

const (
	procSource procKind = iota
	procStage
	procRecordNode
)

// processor is one of ephysd's pieces seen as an Open Ephys processor.
type processor struct {
	processorJSON
	kind  procKind
	stage PythonStage // procStage, when loaded
}

// processors models ephysd as a signal chain: the source, the Python
// stages (loaded ones, else the configured ones), the record node.
func (c *Control) processors() []processor {
	cfg := c.svc.Config()
	info := c.noteInfo()
	srcID, srcName := 100, cfg.Source.Driver+" source"
	var streams []streamJSON
	if info != nil {
		srcID, srcName = info.ProcessorID, info.ProcessorName
		streams = []streamJSON{{Name: info.StreamName, SourceID: info.ProcessorID, SampleRate: info.SampleRate,
			ChannelCount: len(info.Channels), Parameters: []parameterJSON{}}}
	} else {
		streams = []streamJSON{}
	}
	out := []processor{{kind: procSource, processorJSON: processorJSON{
		ID: srcID, Name: srcName, Parameters: []parameterJSON{}, Streams: streams,
	}}}
	prev := srcID
	link := func(p processorJSON) processorJSON {
		pred := prev
		p.Predecessor = &pred
		p.Streams = streams
		prev = p.ID
		return p
	}
	stageParams := func(module, onErr, state string) []parameterJSON {
		if onErr == "" {
			onErr = string(pyrt.OnErrorContinue)
		}
		return []parameterJSON{
			{Name: "module", Type: "Path", Value: module},
			{Name: "on_error", Type: "Categorical", Value: onErr},
			{Name: "state", Type: "String", Value: state},
		}
	}
	onError := func(i int) string {
		if i < len(cfg.Stages) {
			return cfg.Stages[i].OnError
		}
		return ""
	}
	if stages := c.svc.Stages(); len(stages) > 0 {
		for i, st := range stages {
			s := st.Status()
			out = append(out, processor{kind: procStage, stage: st, processorJSON: link(processorJSON{
				ID: st.ID(), Name: PythonProcessorName, Parameters: stageParams(s.Path, onError(i), s.State),
			})})
		}
	} else {
		for i, sc := range cfg.Stages {
			out = append(out, processor{kind: procStage, processorJSON: link(processorJSON{
				ID: firstStageID + i, Name: PythonProcessorName, Parameters: stageParams(sc.Module, sc.OnError, "not loaded"),
			})})
		}
	}
	sess := c.svc.Session()
	out = append(out, processor{kind: procRecordNode, processorJSON: link(processorJSON{
		ID: sess.RecordNodeID(), Name: "Record Node",
		Parameters: []parameterJSON{{Name: "parent_directory", Type: "Path", Value: sess.Naming().Parent}},
	})})
	return out
}

// findProcessor finds {id} (and {stream}, when the route has one: only
// stream 0 exists); nil after a 404.
func (c *Control) findProcessor(w http.ResponseWriter, r *http.Request) *processor {
	procs := c.processors()
	id, err := strconv.Atoi(r.PathValue("id"))
	if err == nil {
		for _, p := range procs {
			if p.ID != id {
				continue
			}
			if s := r.PathValue("stream"); s != "" {
				if i, err := strconv.Atoi(s); err != nil || i != 0 || len(p.Streams) == 0 {
					notFound(w, "processor %d has no stream %q: its one stream is 0 (while acquiring)", p.ID, s)
					return nil
				}
			}
			return &p
		}
	}
	ids := make([]string, len(procs))
	for i, p := range procs {
		ids[i] = strconv.Itoa(p.ID)
	}
	notFound(w, "no processor %q: the processors are %s (GET /api/processors)", r.PathValue("id"), strings.Join(ids, ", "))
	return nil
}

func (c *Control) getProcessors(w http.ResponseWriter, r *http.Request) {
	ps := c.processors()
	out := make([]processorJSON, len(ps))
	for i, p := range ps {
		out[i] = p.processorJSON
	}
	writeJSON(w, struct {
		Processors []processorJSON `json:"processors"`
	}{out})
}

func (c *Control) getProcessor(w http.ResponseWriter, r *http.Request) {
	if p := c.findProcessor(w, r); p != nil {
		writeJSON(w, p.processorJSON)
	}
}

func (c *Control) getStream(w http.ResponseWriter, r *http.Request) {
	if p := c.findProcessor(w, r); p != nil {
		writeJSON(w, p.Streams[0])
	}
}

// parametersOf are a processor's parameters, or its stream's (none: ephysd
// has no per-stream parameters) on a streams/… route.
func parametersOf(r *http.Request, p *processor) []parameterJSON {
	if r.PathValue("stream") != "" {
		return p.Streams[0].Parameters
	}
	return p.Parameters
}

func (c *Control) getParameters(w http.ResponseWriter, r *http.Request) {
	if p := c.findProcessor(w, r); p != nil {
		writeJSON(w, struct {
			Parameters []parameterJSON `json:"parameters"`
		}{parametersOf(r, p)})
	}
}

func findParameter(ps []parameterJSON, name string) *parameterJSON {
	for i := range ps {
		if ps[i].Name == name {
			return &ps[i]
		}
	}
	return nil
}

func (c *Control) getParameter(w http.ResponseWriter, r *http.Request) {
	p := c.findProcessor(w, r)
	if p == nil {
		return
	}
	if prm := findParameter(parametersOf(r, p), r.PathValue("name")); prm != nil {
		writeJSON(w, prm)
		return
	}
	notFoundParameter(w, r, p)
}

// notFoundParameter answers 404 for an unknown parameter of p.
func notFoundParameter(w http.ResponseWriter, r *http.Request, p *processor) {
	var names []string
	for _, prm := range parametersOf(r, p) {
		names = append(names, prm.Name)
	}
	have := "none"
	if len(names) > 0 {
		have = strings.Join(names, ", ")
	}
	notFound(w, "processor %d has no parameter %q: its parameters are %s", p.ID, r.PathValue("name"), have)
}

func (c *Control) putParameter(w http.ResponseWriter, r *http.Request) {
	p := c.findProcessor(w, r)
	if p == nil {
		return
	}
	name := r.PathValue("name")
	if findParameter(parametersOf(r, p), name) == nil {
		notFoundParameter(w, r, p)
		return
	}
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	raw, present := body["value"]
	if !present {
		badRequest(w, "Request must contain value.")
		return
	}
	var value string
	if err := json.Unmarshal(raw, &value); err != nil {
		badRequest(w, "%s must be a string (a path), not %s", name, raw)
		return
	}
	switch {
	case p.kind == procStage && name == "module":
		path := value
		if !filepath.IsAbs(path) {
			// Relative to the stage's current module's folder.
			path = filepath.Join(filepath.Dir(findParameter(p.Parameters, "module").Value), path)
		}
		if err := c.checkModulePath(path); err != nil {
			c.log.Warn("control: stage module change refused", zap.Int("stage", p.ID), zap.String("module", path),
				zap.String("remote", remote(r)), zap.Error(err))
			badRequest(w, "%v", err)
			return
		}
		if err := c.svc.SetStageModule(p.ID, path); err != nil {
			c.keepTraceback(p.ID, err)
			c.log.Warn("control: stage module change refused or failed", zap.Int("stage", p.ID), zap.String("module", path),
				zap.String("remote", remote(r)), zap.Error(err))
			badRequest(w, "%v", err)
			return
		}
		c.log.Info("control: stage module changed", zap.Int("stage", p.ID), zap.String("module", path), zap.String("remote", remote(r)))
	case p.kind == procRecordNode && name == "parent_directory":
		if !c.checkParent(w, value) {
			return
		}
		c.setParent(r, filepath.Clean(value))
	default:
		badRequest(w, "parameter %s of processor %d is read-only here: set it in the configuration file and reload (ephysd reload)", name, p.ID)
		return
	}
	for _, q := range c.processors() {
		if q.ID == p.ID {
			writeJSON(w, findParameter(q.Parameters, name))
			return
		}
	}
	notFound(w, "processor %d went away while its parameter was set", p.ID)
}

func (c *Control) keepTraceback(id int, err error) {
	var le *pyrt.LoadError
	if !errors.As(err, &le) {
		return
	}
	c.mu.Lock()
	c.lastTB = &Traceback{Stage: fmt.Sprintf("%d (%s)", id, le.Path), Text: le.Traceback, At: time.Now()}
	c.mu.Unlock()
}

func (c *Control) putConfig(w http.ResponseWriter, r *http.Request) {
	p := c.findProcessor(w, r)
	if p == nil {
		return
	}
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	var text string
	if err := json.Unmarshal(body["text"], &text); err != nil {
		badRequest(w, "the request needs \"text\" (a string)")
		return
	}
	if p.kind != procStage {
		badRequest(w, "processor %d (%s) takes no configuration messages; Python stages take \"reload\"", p.ID, p.Name)
		return
	}
	if !strings.EqualFold(strings.TrimSpace(text), "reload") {
		badRequest(w, "unknown configuration message %q for Python stage %d: the one it takes is \"reload\"", text, p.ID)
		return
	}
	if p.stage == nil {
		badRequest(w, "Python stage %d is not loaded yet: stages load at the first acquisition", p.ID)
		return
	}
	if err := p.stage.Reload(); err != nil {
		c.keepTraceback(p.ID, err)
		c.log.Warn("control: stage reload failed; the previous version keeps running", zap.Int("stage", p.ID),
			zap.String("remote", remote(r)), zap.Error(err))
		badRequest(w, "%v", err)
		return
	}
	c.log.Info("control: stage reloaded", zap.Int("stage", p.ID), zap.String("module", p.stage.Path()), zap.String("remote", remote(r)))
	writeJSON(w, struct {
		Info string `json:"info"`
	}{fmt.Sprintf("reloaded %s", p.stage.Path())})
}

// --- cpu, latency ---

func (c *Control) getCPU(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, struct {
		Usage float64 `json:"usage"`
	}{c.cpu.usage()})
}

type latencyJSON struct {
	ID      int                 `json:"id"`
	Name    string              `json:"name"`
	Streams []streamLatencyJSON `json:"streams"`
}

type streamLatencyJSON struct {
	Name    string  `json:"name"`
	Latency float64 `json:"latency"` // ms
}

func (c *Control) getLatency(w http.ResponseWriter, r *http.Request) {
	st := c.svc.Status()
	p50 := map[int]float64{}
	for _, s := range st.Stages {
		p50[s.ID] = s.P50 / 1000
	}
	var out []latencyJSON
	for _, p := range c.processors() {
		if p.kind == procRecordNode {
			continue
		}
		l := latencyJSON{ID: p.ID, Name: p.Name, Streams: []streamLatencyJSON{}}
		for _, s := range p.Streams {
			l.Streams = append(l.Streams, streamLatencyJSON{Name: s.Name, Latency: p50[p.ID]})
		}
		out = append(out, l)
	}
	writeJSON(w, struct {
		Processors []latencyJSON `json:"processors"`
	}{out})
}

// --- quit ---

func (c *Control) quit(w http.ResponseWriter, r *http.Request) {
	if c.opts.Quit == nil {
		badRequest(w, "this ephysd cannot be quit through its API: stop the service (systemctl stop ephysd)")
		return
	}
	c.log.Info("control: quit requested", zap.String("remote", remote(r)))
	writeJSON(w, struct {
		Info string `json:"info"`
	}{"Quitting ephysd"})
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	go c.opts.Quit()
}

func (c *Control) putQuit(w http.ResponseWriter, r *http.Request) { c.quit(w, r) }

func (c *Control) putWindow(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	cmd, _, ok := stringField(w, body, "command")
	if !ok {
		return
	}
	if !strings.EqualFold(cmd, "quit") {
		badRequest(w, "window command %q: ephysd has no window; the one command it takes is \"quit\"", cmd)
		return
	}
	c.quit(w, r)
}

// --- ephysd's own ---

// ControlStatus is GET /api/ephysd/status: the service's Status with the
// health, the process's CPU use and the last full Python traceback.
type ControlStatus struct {
	Status
	Health        string     `json:"health"` // "ok" or why not
	CPU           float64    `json:"cpu_usage"`
	LastTraceback *Traceback `json:"last_traceback,omitempty"`
}

func (c *Control) getEphysdStatus(w http.ResponseWriter, r *http.Request) {
	cs := ControlStatus{Status: c.svc.Status(), Health: "ok", CPU: c.cpu.usage()}
	if err := c.svc.Healthy(); err != nil {
		cs.Health = err.Error()
	}
	c.noteInfo()
	c.mu.Lock()
	cs.LastTraceback = c.lastTB
	c.mu.Unlock()
	writeJSON(w, cs)
}

func (c *Control) putReload(w http.ResponseWriter, r *http.Request) {
	before := c.svc.Config().Control
	notes, err := c.svc.Reload(c.opts.ConfigPath)
	if err != nil {
		c.keepTraceback(0, err)
		c.log.Warn("control: reload failed", zap.String("config", c.opts.ConfigPath), zap.String("remote", remote(r)), zap.Error(err))
		badRequest(w, "reload %s: %v", c.opts.ConfigPath, err)
		return
	}
	after := c.svc.Config().Control
	before.ModuleDirs, after.ModuleDirs = nil, nil
	before.StartMode, after.StartMode = "", ""
	if !reflect.DeepEqual(before, after) {
		if notes != "" {
			notes += "; "
		}
		notes += "[control] http, socket and token changes take effect when ephysd restarts"
	}
	c.log.Info("control: configuration reloaded", zap.String("config", c.opts.ConfigPath), zap.String("notes", notes), zap.String("remote", remote(r)))
	writeJSON(w, struct {
		Notes string `json:"notes"`
	}{notes})
}

func (c *Control) putStagesReload(w http.ResponseWriter, r *http.Request) {
	stages := c.svc.Stages()
	if err := c.svc.ReloadStages(); err != nil {
		for _, st := range stages {
			c.keepTraceback(st.ID(), err)
		}
		c.log.Warn("control: stage reload failed; the previous versions keep running", zap.String("remote", remote(r)), zap.Error(err))
		badRequest(w, "%v", err)
		return
	}
	info := fmt.Sprintf("reloaded %d Python stages", len(stages))
	if len(stages) == 0 {
		info = "no Python stage is loaded yet: they load at the first acquisition"
	}
	c.log.Info("control: stages reloaded", zap.Int("stages", len(stages)), zap.String("remote", remote(r)))
	writeJSON(w, struct {
		Info string `json:"info"`
	}{info})
}

func (c *Control) getHealth(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if err := c.svc.Healthy(); err != nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, err.Error())
		return
	}
	fmt.Fprintln(w, "ok")
}

// --- CPU use ---

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times (100 on every
// Linux architecture).
const clockTicks = 100

// cpuSampler measures this process's CPU use over the last second from
// /proc/self/stat, as a fraction of the machine's CPUs (0–1), like the
// GUI's "proportion of available CPU".
type cpuSampler struct {
	mu    sync.Mutex
	t     time.Time
	ticks uint64
	last  float64
	have  bool
	done  chan struct{}
}

func newCPUSampler() *cpuSampler {
	s := &cpuSampler{done: make(chan struct{}), t: time.Now()}
	if t, err := readCPUTicks(); err == nil {
		s.ticks = t
	}
	go func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-s.done:
				return
			case <-tick.C:
				s.mu.Lock()
				s.last, s.t, s.ticks = s.sinceLocked()
				s.have = true
				s.mu.Unlock()
			}
		}
	}()
	return s
}

func (s *cpuSampler) sinceLocked() (usage float64, now time.Time, ticks uint64) {
	now = time.Now()
	ticks, err := readCPUTicks()
	if err != nil {
		return 0, now, s.ticks
	}
	el := now.Sub(s.t).Seconds()
	if el <= 0 || ticks < s.ticks {
		return 0, now, ticks
	}
	return float64(ticks-s.ticks) / clockTicks / el / float64(runtime.NumCPU()), now, ticks
}

// usage is the CPU use over the last whole second (over the time since
// the start before the first second).
func (s *cpuSampler) usage() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.have {
		return s.last
	}
	u, _, _ := s.sinceLocked()
	return u
}

func (s *cpuSampler) stop() { close(s.done) }

// readCPUTicks is utime + stime of this process, in clock ticks.
func readCPUTicks() (uint64, error) {
	data, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, err
	}
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return 0, errors.New("/proc/self/stat: unexpected format")
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("/proc/self/stat: unexpected format")
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64) // field 14
	st, err2 := strconv.ParseUint(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/self/stat: %w", err)
	}
	return ut + st, nil
}
