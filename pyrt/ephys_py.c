// ephys_py.c — the C side of pyrt. See ephys_py.h.
//
// Threading: the interpreter is initialised on one OS thread (Go's pinned
// interpreter goroutine), which keeps its thread state for the life of the
// process and holds the GIL only inside calls from this file
// (PyEval_RestoreThread … PyEval_SaveThread). Loading modules may happen on
// any thread: those calls take the GIL with PyGILState_Ensure and release it
// before returning.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <string.h>

#include "ephys_py.h"
#include "_cgo_export.h"

struct ephys_stage {
	int id;
	char *name;

	// Current instance and its bound members (NULL when absent).
	PyObject *module;
	PyObject *instance;
	PyObject *m_process, *m_ttl, *m_spike;
	PyObject *m_hooks[4];

	// A loaded instance waiting for ephys_stage_commit.
	PyObject *pending_module;
	PyObject *pending_instance;

	PyObject *processor; // the oe_pyprocessor.PythonProcessor passed to __init__

	// Cached shape tuple for the data array.
	PyObject *shape;
	int shape_ch, shape_n;

	int64_t block_first;
	int block_samples;
	int accepting; // add_python_event is kept only while acquiring

	ephys_out_event events[EPHYS_MAX_EVENTS];
	int nevents;
	int64_t dropped;

	PyObject *exc_type, *exc_value, *exc_tb;
};

static PyThreadState *main_ts;
static unsigned long main_thread_id; // the interpreter thread, for ephys_interrupt
// The per-block call in progress (changed with the GIL held), watched by
// the Go watchdog for hung scripts.
static int64_t call_id;
static int call_active;
static int call_stage;

static void call_begin(ephys_stage *st) {
	__atomic_store_n(&call_stage, st->id, __ATOMIC_RELAXED);
	__atomic_add_fetch(&call_id, 1, __ATOMIC_RELAXED);
	__atomic_store_n(&call_active, 1, __ATOMIC_RELEASE);
}

static int interrupt_pending; // GIL held

static void call_end(void) {
	// A TimeoutError scheduled too late to fire inside this call must not
	// hit the next one.
	if (interrupt_pending) {
		PyThreadState_SetAsyncExc(main_thread_id, NULL);
		interrupt_pending = 0;
	}
	__atomic_store_n(&call_active, 0, __ATOMIC_RELEASE);
}

int64_t ephys_call_state(int *active, int *stage) {
	*active = __atomic_load_n(&call_active, __ATOMIC_ACQUIRE);
	*stage = __atomic_load_n(&call_stage, __ATOMIC_RELAXED);
	return __atomic_load_n(&call_id, __ATOMIC_RELAXED);
}
static _Thread_local int on_interp_thread;
static _Thread_local ephys_stage *current_stage; // for module-level add_python_event and logs

static PyObject *np_ndarray, *np_float32, *np_frombuffer;
static PyObject *boot; // the _ephysd bootstrap module
static PyObject *str_reshape;
static PyObject *channel_names; // dict: processor id -> str

static const char *hook_names[4] = {"start_acquisition", "stop_acquisition", "start_recording", "stop_recording"};

// ---------------------------------------------------------------- oe_pyprocessor

typedef struct {
	PyObject_HEAD
	ephys_stage *stage;
} PythonProcessorObject;

static PyObject *queue_event(ephys_stage *st, PyObject *args, PyObject *kwargs) {
	static char *kwlist[] = {"line", "state", "sample_number", NULL};
	int line;
	PyObject *state;
	PyObject *sample = Py_None;
	if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO|O:add_python_event", kwlist, &line, &state, &sample))
		return NULL;
	if (line < 0 || line > 255) {
		PyErr_Format(PyExc_ValueError, "add_python_event: line must be 0..255, got %d", line);
		return NULL;
	}
	int on = PyObject_IsTrue(state);
	if (on < 0)
		return NULL;
	int64_t sn = -1;
	if (sample != Py_None) {
		long long v = PyLong_AsLongLong(sample);
		if (v == -1 && PyErr_Occurred())
			return NULL;
		if (st->block_samples > 0 && (v < st->block_first || v >= st->block_first + st->block_samples)) {
			PyErr_Format(PyExc_ValueError,
			             "add_python_event: sample_number %lld is outside the current block [%lld, %lld)",
			             v, (long long)st->block_first, (long long)(st->block_first + st->block_samples));
			return NULL;
		}
		sn = v;
	}
	if (!st->accepting)
		Py_RETURN_NONE; // Open Ephys drops events queued while acquisition is not running
	if (st->nevents >= EPHYS_MAX_EVENTS) {
		st->dropped++;
		Py_RETURN_NONE;
	}
	ephys_out_event *e = &st->events[st->nevents++];
	e->line = line;
	e->state = on;
	e->sample = sn;
	Py_RETURN_NONE;
}

static PyObject *PythonProcessor_add_python_event(PythonProcessorObject *self, PyObject *args, PyObject *kwargs) {
	if (self->stage == NULL) {
		PyErr_SetString(PyExc_RuntimeError, "add_python_event: this PythonProcessor is not attached to an ephysd stage");
		return NULL;
	}
	return queue_event(self->stage, args, kwargs);
}

static PyObject *PythonProcessor_get_sample_number(PythonProcessorObject *self, void *closure) {
	if (self->stage == NULL)
		Py_RETURN_NONE;
	return PyLong_FromLongLong(self->stage->block_first);
}

static PyObject *PythonProcessor_get_stage_id(PythonProcessorObject *self, void *closure) {
	return PyLong_FromLong(self->stage ? self->stage->id : -1);
}

static PyMethodDef PythonProcessor_methods[] = {
	{"add_python_event", (PyCFunction)(void (*)(void))PythonProcessor_add_python_event, METH_VARARGS | METH_KEYWORDS,
	 "add_python_event(line, state, sample_number=None)\n--\n\n"
	 "Queue a TTL event on the stage's output channel. Without sample_number the event\n"
	 "is stamped with the block's first sample number (as in Open Ephys)."},
	{NULL}};

static PyGetSetDef PythonProcessor_getset[] = {
	{"sample_number", (getter)PythonProcessor_get_sample_number, NULL,
	 "first sample number of the block being processed (ephysd extension)", NULL},
	{"node_id", (getter)PythonProcessor_get_stage_id, NULL, "this stage's processor id (ephysd extension)", NULL},
	{NULL}};

static PyTypeObject PythonProcessorType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "oe_pyprocessor.PythonProcessor",
	.tp_basicsize = sizeof(PythonProcessorObject),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "The processor object passed to PyProcessor.__init__.",
	.tp_methods = PythonProcessor_methods,
	.tp_getset = PythonProcessor_getset,
	.tp_new = PyType_GenericNew,
};

static PyObject *module_add_python_event(PyObject *mod, PyObject *args, PyObject *kwargs) {
	if (current_stage == NULL) {
		PyErr_SetString(PyExc_RuntimeError, "oe_pyprocessor.add_python_event called outside a stage call");
		return NULL;
	}
	return queue_event(current_stage, args, kwargs);
}

static PyObject *module_log(PyObject *mod, PyObject *args) {
	int stream;
	const char *text;
	Py_ssize_t n;
	if (!PyArg_ParseTuple(args, "is#", &stream, &text, &n))
		return NULL;
	int id = current_stage ? current_stage->id : 0;
	Py_BEGIN_ALLOW_THREADS
	goPyrtLog(id, stream, (char *)text, (int)n);
	Py_END_ALLOW_THREADS
	Py_RETURN_NONE;
}

static PyMethodDef oe_methods[] = {
	{"add_python_event", (PyCFunction)(void (*)(void))module_add_python_event, METH_VARARGS | METH_KEYWORDS,
	 "add_python_event(line, state, sample_number=None): queue an event from the stage being called."},
	{"_log", module_log, METH_VARARGS, "internal: a line of the stage's stdout (1) or stderr (2)"},
	{NULL}};

static struct PyModuleDef oe_module = {PyModuleDef_HEAD_INIT, "oe_pyprocessor",
                                       "Open Ephys Python Processor API, as provided by ephysd.", -1, oe_methods};

static PyObject *PyInit_oe_pyprocessor(void) {
	if (PyType_Ready(&PythonProcessorType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&oe_module);
	if (m == NULL)
		return NULL;
	Py_INCREF(&PythonProcessorType);
	if (PyModule_AddObject(m, "PythonProcessor", (PyObject *)&PythonProcessorType) < 0) {
		Py_DECREF(&PythonProcessorType);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}

// ---------------------------------------------------------------- bootstrap

static const char *boot_source =
	"import sys, io, inspect, traceback, importlib.util\n"
	"import oe_pyprocessor as _oe\n"
	"class _Stream(io.TextIOBase):\n"
	"    def __init__(self, which):\n"
	"        self._which = which\n"
	"        self._buf = ''\n"
	"    encoding = 'utf-8'\n"
	"    errors = 'replace'\n"
	"    def writable(self):\n"
	"        return True\n"
	"    def isatty(self):\n"
	"        return False\n"
	"    def write(self, s):\n"
	"        if not isinstance(s, str):\n"
	"            raise TypeError('write() argument must be str, not ' + type(s).__name__)\n"
	"        self._buf += s\n"
	"        if '\\n' in self._buf:\n"
	"            lines = self._buf.split('\\n')\n"
	"            self._buf = lines.pop()\n"
	"            for line in lines:\n"
	"                _oe._log(self._which, line)\n"
	"        return len(s)\n"
	"    def flush(self):\n"
	"        if self._buf:\n"
	"            b, self._buf = self._buf, ''\n"
	"            _oe._log(self._which, b)\n"
	"import signal as _signal\n"
	"_signal_signal = _signal.signal\n"
	"def _ephysd_signal(signalnum, handler):\n"
	"    # ephysd owns the process's signals (SIGINT/SIGTERM stop it cleanly);\n"
	"    # a handler installed here would silently take them from it.\n"
	"    _oe._log(2, 'ephysd: signal.signal(%r, ...) ignored: the daemon handles signals' % (signalnum,))\n"
	"    return _signal.getsignal(signalnum)\n"
	"_signal.signal = _ephysd_signal\n"
	"sys.stdout = _Stream(1)\n"
	"sys.stderr = _Stream(2)\n"
	"def load(modname, path, folder):\n"
	"    if folder not in sys.path:\n"
	"        sys.path.insert(0, folder)\n"
	"    spec = importlib.util.spec_from_file_location(modname, path)\n"
	"    if spec is None or spec.loader is None:\n"
	"        raise ImportError('cannot import %s: not a Python source file' % path)\n"
	"    mod = importlib.util.module_from_spec(spec)\n"
	"    old = sys.modules.get(modname)\n"
	"    sys.modules[modname] = mod\n"
	"    try:\n"
	"        spec.loader.exec_module(mod)\n"
	"    except BaseException:\n"
	"        if old is not None:\n"
	"            sys.modules[modname] = old\n"
	"        else:\n"
	"            sys.modules.pop(modname, None)\n"
	"        raise\n"
	"    return mod\n"
	"def instantiate(mod, processor, num_channels, sample_rate):\n"
	"    cls = getattr(mod, 'PyProcessor', None)\n"
	"    if cls is None:\n"
	"        raise AttributeError('%s defines no class PyProcessor' % mod.__file__)\n"
	"    if not callable(getattr(cls, 'process', None)):\n"
	"        raise AttributeError('%s: class PyProcessor has no process(self, data) method, which is required' % mod.__file__)\n"
	"    init = cls.__init__\n"
	"    if init is object.__init__:\n"
	"        return cls()\n"
	"    try:\n"
	"        params = list(inspect.signature(init).parameters.values())\n"
	"    except (TypeError, ValueError):\n"
	"        params = None\n"
	"    if params is not None:\n"
	"        P = inspect.Parameter\n"
	"        positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]\n"
	"        varargs = any(p.kind == P.VAR_POSITIONAL for p in params)\n"
	"        if not varargs and len(positional) == 3:\n"
	"            return cls(num_channels, sample_rate)\n"
	"    return cls(processor, num_channels, sample_rate)\n"
	"def format_error(t, v, tb, full):\n"
	"    if full:\n"
	"        return ''.join(traceback.format_exception(t, v, tb)).rstrip()\n"
	"    return ''.join(traceback.format_exception_only(t, v)).rstrip()\n";

static char *fetch_error_text(void) {
	// Formats and clears the current Python exception. GIL held.
	PyObject *t, *v, *tb;
	PyErr_Fetch(&t, &v, &tb);
	if (t == NULL)
		return strdup("unknown Python error");
	PyErr_NormalizeException(&t, &v, &tb);
	char *out = NULL;
	if (boot != NULL) {
		PyObject *s = PyObject_CallMethod(boot, "format_error", "OOOi", t, v ? v : Py_None, tb ? tb : Py_None, 1);
		if (s != NULL) {
			const char *u = PyUnicode_AsUTF8(s);
			if (u)
				out = strdup(u);
			Py_DECREF(s);
		}
		PyErr_Clear();
	}
	if (out == NULL) {
		PyObject *s = v ? PyObject_Str(v) : NULL;
		const char *u = s ? PyUnicode_AsUTF8(s) : NULL;
		out = strdup(u ? u : "Python error (unprintable)");
		Py_XDECREF(s);
		PyErr_Clear();
	}
	Py_XDECREF(t);
	Py_XDECREF(v);
	Py_XDECREF(tb);
	return out;
}

int ephys_init(const char *program, const char *stdlib_check, double switch_interval, char **err) {
	if (Py_IsInitialized()) {
		*err = strdup("Python is already initialised in this process");
		return -1;
	}
	if (PyImport_AppendInittab("oe_pyprocessor", PyInit_oe_pyprocessor) < 0) {
		*err = strdup("cannot register the oe_pyprocessor module");
		return -1;
	}
	PyStatus status;
	PyConfig config;
	PyConfig_InitIsolatedConfig(&config);
	config.install_signal_handlers = 0;
	config.site_import = 1;
	config.user_site_directory = 0;
	config.parse_argv = 0;
	config.buffered_stdio = 0;
	status = PyConfig_SetBytesString(&config, &config.program_name, program);
	if (!PyStatus_Exception(status))
		status = PyConfig_SetBytesString(&config, &config.executable, program);
	if (!PyStatus_Exception(status))
		status = Py_InitializeFromConfig(&config);
	PyConfig_Clear(&config);
	if (PyStatus_Exception(status)) {
		const char *m = status.err_msg ? status.err_msg : "unknown error";
		const char *f = status.func ? status.func : "";
		size_t n = strlen(m) + strlen(f) + 64;
		*err = malloc(n);
		snprintf(*err, n, "Python initialisation failed: %s%s%s", f, *f ? ": " : "", m);
		return -1;
	}
	on_interp_thread = 1;
	main_thread_id = PyThread_get_thread_ident();

	PyObject *sys = PyImport_ImportModule("sys");
	if (sys != NULL) {
		PyObject *r = PyObject_CallMethod(sys, "setswitchinterval", "d", switch_interval);
		Py_XDECREF(r);
		Py_DECREF(sys);
	}
	if (PyErr_Occurred())
		goto fail;

	PyObject *code = Py_CompileString(boot_source, "<ephysd>", Py_file_input);
	if (code == NULL)
		goto fail;
	boot = PyImport_ExecCodeModule("_ephysd", code);
	Py_DECREF(code);
	if (boot == NULL)
		goto fail;

	PyObject *np = PyImport_ImportModule("numpy");
	if (np == NULL) {
		char *e = fetch_error_text();
		size_t n = strlen(e) + 256;
		*err = malloc(n);
		snprintf(*err, n, "numpy cannot be imported by the embedded Python (%s): %s", stdlib_check, e);
		free(e);
		main_ts = PyEval_SaveThread();
		return -2;
	}
	np_ndarray = PyObject_GetAttrString(np, "ndarray");
	np_float32 = PyObject_GetAttrString(np, "float32");
	np_frombuffer = PyObject_GetAttrString(np, "frombuffer");
	Py_DECREF(np);
	str_reshape = PyUnicode_InternFromString("reshape");
	channel_names = PyDict_New();
	if (!np_ndarray || !np_float32 || !np_frombuffer || !str_reshape || !channel_names)
		goto fail;
	main_ts = PyEval_SaveThread();
	return 0;
fail:
	*err = fetch_error_text();
	main_ts = PyEval_SaveThread();
	return -1;
}

int ephys_is_initialized(void) { return Py_IsInitialized(); }

const char *ephys_linked_version(void) { return PY_VERSION; }

int ephys_on_thread(void) { return on_interp_thread; }

char *ephys_sys_info(void) {
	PyGILState_STATE g = PyGILState_Ensure();
	char *out = NULL;
	PyObject *r = PyRun_String(
		"__import__('sys').prefix + '\\n' + __import__('sys').executable + '\\n' + "
		"'%d.%d.%d' % __import__('sys').version_info[:3] + '\\n' + __import__('numpy').__version__",
		Py_eval_input, PyModule_GetDict(boot), PyModule_GetDict(boot));
	if (r != NULL) {
		const char *u = PyUnicode_AsUTF8(r);
		out = strdup(u ? u : "");
		Py_DECREF(r);
	} else {
		out = fetch_error_text();
	}
	PyGILState_Release(g);
	return out;
}

int ephys_run_string(const char *src, char **err) {
	PyGILState_STATE g = PyGILState_Ensure();
	int rc = 0;
	PyObject *globals = PyDict_New();
	PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins());
	PyObject *r = PyRun_String(src, Py_file_input, globals, globals);
	if (r == NULL) {
		*err = fetch_error_text();
		rc = 1;
	}
	Py_XDECREF(r);
	Py_DECREF(globals);
	PyGILState_Release(g);
	return rc;
}

int ephys_interrupt(int64_t id) {
	// Takes the GIL from the running Python code at its next switch
	// interval, then, if the same call is still running, schedules
	// TimeoutError in the interpreter thread.
	PyGILState_STATE g = PyGILState_Ensure();
	int n = 0;
	if (call_active && call_id == id) {
		n = PyThreadState_SetAsyncExc(main_thread_id, PyExc_TimeoutError);
		interrupt_pending = 1;
	}
	PyGILState_Release(g);
	return n;
}

int ephys_register_channel(int processor_id, const char *name) {
	PyGILState_STATE g = PyGILState_Ensure();
	int rc = -1;
	PyObject *k = PyLong_FromLong(processor_id);
	PyObject *v = PyUnicode_FromString(name);
	if (k && v)
		rc = PyDict_SetItem(channel_names, k, v);
	Py_XDECREF(k);
	Py_XDECREF(v);
	PyErr_Clear();
	PyGILState_Release(g);
	return rc;
}

// ---------------------------------------------------------------- stages

ephys_stage *ephys_stage_new(int id, const char *name) {
	ephys_stage *st = calloc(1, sizeof(ephys_stage));
	if (st == NULL)
		return NULL;
	st->id = id;
	st->name = strdup(name);
	PyGILState_STATE g = PyGILState_Ensure();
	PythonProcessorObject *p = PyObject_New(PythonProcessorObject, &PythonProcessorType);
	if (p != NULL)
		p->stage = st;
	st->processor = (PyObject *)p;
	PyErr_Clear();
	PyGILState_Release(g);
	if (st->processor == NULL) {
		free(st->name);
		free(st);
		return NULL;
	}
	return st;
}

int ephys_stage_load(ephys_stage *st, const char *path, const char *modname, int channels, double rate, char **err) {
	PyGILState_STATE g = PyGILState_Ensure();
	ephys_stage *prev = current_stage;
	current_stage = st;
	int rc = 0;
	PyObject *mod = NULL, *inst = NULL;
	char *folder = strdup(path);
	char *slash = strrchr(folder, '/');
	if (slash != NULL)
		*slash = 0;
	mod = PyObject_CallMethod(boot, "load", "sss", modname, path, slash ? folder : ".");
	free(folder);
	if (mod == NULL) {
		*err = fetch_error_text();
		rc = 1;
		goto out;
	}
	inst = PyObject_CallMethod(boot, "instantiate", "OOid", mod, st->processor, channels, rate);
	if (inst == NULL) {
		*err = fetch_error_text();
		rc = 2;
		Py_DECREF(mod);
		goto out;
	}
	Py_XDECREF(st->pending_module);
	Py_XDECREF(st->pending_instance);
	st->pending_module = mod;
	st->pending_instance = inst;
out:
	current_stage = prev;
	PyGILState_Release(g);
	return rc;
}

static void clear_current(ephys_stage *st) {
	Py_CLEAR(st->m_process);
	Py_CLEAR(st->m_ttl);
	Py_CLEAR(st->m_spike);
	for (int i = 0; i < 4; i++)
		Py_CLEAR(st->m_hooks[i]);
	Py_CLEAR(st->instance);
	Py_CLEAR(st->module);
}

static PyObject *optional_member(PyObject *inst, const char *name) {
	PyObject *m = PyObject_GetAttrString(inst, name);
	if (m == NULL || !PyCallable_Check(m)) {
		Py_XDECREF(m);
		PyErr_Clear();
		return NULL;
	}
	return m;
}

int ephys_stage_commit(ephys_stage *st) {
	if (!on_interp_thread)
		return -1;
	PyEval_RestoreThread(main_ts);
	int rc = 0;
	if (st->pending_instance == NULL) {
		rc = 2;
	} else {
		clear_current(st);
		st->module = st->pending_module;
		st->instance = st->pending_instance;
		st->pending_module = st->pending_instance = NULL;
		st->m_process = optional_member(st->instance, "process");
		st->m_ttl = optional_member(st->instance, "handle_ttl_event");
		st->m_spike = optional_member(st->instance, "handle_spike");
		for (int i = 0; i < 4; i++)
			st->m_hooks[i] = optional_member(st->instance, hook_names[i]);
	}
	main_ts = PyEval_SaveThread();
	return rc;
}

void ephys_stage_discard(ephys_stage *st) {
	PyGILState_STATE g = PyGILState_Ensure();
	Py_CLEAR(st->pending_module);
	Py_CLEAR(st->pending_instance);
	PyGILState_Release(g);
}

int ephys_stage_has_current(ephys_stage *st) { return st->instance != NULL && st->m_process != NULL; }

void ephys_stage_set_accepting(ephys_stage *st, int on) { st->accepting = on; }

static void keep_error(ephys_stage *st) {
	Py_XDECREF(st->exc_type);
	Py_XDECREF(st->exc_value);
	Py_XDECREF(st->exc_tb);
	PyErr_Fetch(&st->exc_type, &st->exc_value, &st->exc_tb);
	PyErr_NormalizeException(&st->exc_type, &st->exc_value, &st->exc_tb);
}

char *ephys_stage_error(ephys_stage *st, int full) {
	if (st->exc_type == NULL)
		return NULL;
	PyGILState_STATE g = PyGILState_Ensure();
	char *out = NULL;
	if (full < 0) { // only clear: the frames of a traceback hold the script's locals alive
		Py_CLEAR(st->exc_type);
		Py_CLEAR(st->exc_value);
		Py_CLEAR(st->exc_tb);
		PyGILState_Release(g);
		return NULL;
	}
	PyObject *s = PyObject_CallMethod(boot, "format_error", "OOOi", st->exc_type, st->exc_value ? st->exc_value : Py_None,
	                                  st->exc_tb ? st->exc_tb : Py_None, full);
	if (s != NULL) {
		const char *u = PyUnicode_AsUTF8(s);
		out = strdup(u ? u : "");
		Py_DECREF(s);
	}
	if (out == NULL) {
		PyErr_Clear();
		out = strdup("Python error (could not be formatted)");
	}
	Py_CLEAR(st->exc_type);
	Py_CLEAR(st->exc_value);
	Py_CLEAR(st->exc_tb);
	PyGILState_Release(g);
	return out;
}

int ephys_stage_process(ephys_stage *st, float *data, int channels, int samples, int64_t first) {
	if (!on_interp_thread)
		return -1;
	if (st->m_process == NULL)
		return 2;
	PyEval_RestoreThread(main_ts);
	call_begin(st);
	current_stage = st;
	st->block_first = first;
	st->block_samples = samples;
	int rc = 0;
	if (st->shape == NULL || st->shape_ch != channels || st->shape_n != samples) {
		Py_XDECREF(st->shape);
		st->shape = Py_BuildValue("(ii)", channels, samples);
		st->shape_ch = channels;
		st->shape_n = samples;
	}
	PyObject *mv = NULL, *arr = NULL, *res = NULL;
	if (st->shape == NULL)
		goto error;
	mv = PyMemoryView_FromMemory((char *)data, (Py_ssize_t)channels * samples * (Py_ssize_t)sizeof(float), PyBUF_WRITE);
	if (mv == NULL)
		goto error;
	arr = PyObject_CallFunctionObjArgs(np_ndarray, st->shape, np_float32, mv, NULL);
	if (arr == NULL)
		goto error;
	res = PyObject_CallOneArg(st->m_process, arr);
	if (res == NULL)
		goto error;
	Py_DECREF(res);
	goto out;
error:
	keep_error(st);
	rc = 1;
out:
	Py_XDECREF(arr);
	if (mv != NULL) {
		// Anything still holding a view of the block (the script kept
		// `data`) keeps the memoryview alive.
		if (Py_REFCNT(mv) > 1)
			rc |= EPHYS_RETAINED;
		Py_DECREF(mv);
	}
	st->block_samples = 0;
	current_stage = NULL;
	call_end();
	main_ts = PyEval_SaveThread();
	return rc;
}

int ephys_stage_ttl(ephys_stage *st, int source_node, int line, int state, int64_t sample) {
	if (!on_interp_thread)
		return -1;
	if (st->m_ttl == NULL)
		return 2;
	PyEval_RestoreThread(main_ts);
	call_begin(st);
	current_stage = st;
	int rc = 0;
	PyObject *node = PyLong_FromLong(source_node);
	PyObject *chan = NULL;
	if (node != NULL) {
		chan = PyDict_GetItem(channel_names, node); // borrowed
		if (chan == NULL)
			chan = PyUnicode_FromString("TTL");
		else
			Py_INCREF(chan);
	}
	PyObject *sn = PyLong_FromLongLong(sample);
	PyObject *ln = PyLong_FromLong(line);
	PyObject *res = NULL;
	if (node && chan && sn && ln)
		res = PyObject_CallFunctionObjArgs(st->m_ttl, node, chan, sn, ln, state ? Py_True : Py_False, NULL);
	if (res == NULL) {
		keep_error(st);
		rc = 1;
	}
	Py_XDECREF(res);
	Py_XDECREF(node);
	Py_XDECREF(chan);
	Py_XDECREF(sn);
	Py_XDECREF(ln);
	current_stage = NULL;
	call_end();
	main_ts = PyEval_SaveThread();
	return rc;
}

int ephys_stage_spike(ephys_stage *st, int source_node, const char *electrode, int channels, int samples,
                      int64_t sample, int sorted_id, const float *waveform) {
	if (!on_interp_thread)
		return -1;
	if (st->m_spike == NULL)
		return 2;
	PyEval_RestoreThread(main_ts);
	call_begin(st);
	current_stage = st;
	int rc = 0;
	// The waveform is copied into immutable bytes, so the array is read-only
	// and owns its memory.
	PyObject *bytes = PyBytes_FromStringAndSize((const char *)waveform, (Py_ssize_t)channels * samples * sizeof(float));
	PyObject *flat = bytes ? PyObject_CallFunctionObjArgs(np_frombuffer, bytes, np_float32, NULL) : NULL;
	PyObject *arr = flat ? PyObject_CallMethod(flat, "reshape", "(ii)", channels, samples) : NULL;
	PyObject *res = NULL;
	if (arr != NULL)
		res = PyObject_CallFunction(st->m_spike, "isiiLiO", source_node, electrode, channels, samples, (long long)sample,
		                            sorted_id, arr);
	if (res == NULL) {
		keep_error(st);
		rc = 1;
	}
	Py_XDECREF(res);
	Py_XDECREF(arr);
	Py_XDECREF(flat);
	Py_XDECREF(bytes);
	current_stage = NULL;
	call_end();
	main_ts = PyEval_SaveThread();
	return rc;
}

int ephys_stage_hook(ephys_stage *st, int which, const char *arg) {
	if (!on_interp_thread)
		return -1;
	if (which < 0 || which > 3 || st->m_hooks[which] == NULL)
		return 2;
	PyEval_RestoreThread(main_ts);
	current_stage = st;
	int rc = 0;
	PyObject *res = arg ? PyObject_CallFunction(st->m_hooks[which], "s", arg) : PyObject_CallNoArgs(st->m_hooks[which]);
	if (res == NULL) {
		keep_error(st);
		rc = 1;
	}
	Py_XDECREF(res);
	// Flush partial output lines so hook prints appear promptly.
	PyObject *sys_stdout = PySys_GetObject("stdout");
	if (sys_stdout != NULL) {
		PyObject *r = PyObject_CallMethod(sys_stdout, "flush", NULL);
		Py_XDECREF(r);
		PyErr_Clear();
	}
	current_stage = NULL;
	main_ts = PyEval_SaveThread();
	return rc;
}

ephys_out_event *ephys_stage_events(ephys_stage *st) { return st->events; }

int ephys_stage_nevents(ephys_stage *st) { return st->nevents; }

int64_t ephys_stage_dropped(ephys_stage *st) { return st->dropped; }

void ephys_stage_events_reset(ephys_stage *st) {
	st->nevents = 0;
	st->dropped = 0;
}
