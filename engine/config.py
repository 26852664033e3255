"""Read a job file, report errors as one clear line, fill defaults, validate.

    load_job(path)  -> JobProto (normalised and validated)
    parse_job(text, path) -> JobProto (syntax only, with file:line:col errors)
    layers_in_phase(net, phase) -> the LayerProtos of that phase

Every problem raises ConfigError whose message is the single line the CLI
prints: ``path:line:col: message`` for syntax, ``path: layer "x": message``
for a layer, ``path: message`` otherwise.
"""
from __future__ import annotations

import difflib
import math
import pathlib
import re

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor

from engine.common import (  # noqa: F401  (re-exported: the config API)
    ConfigError, Phase, job_dir, number_problem, read_file, read_text, type_name)
from engine.layers import REGISTRY, layer_class
from engine.layers.base import LossLayer
from engine.params import ParamError, check_param_conf
from engine.proto import job_pb2 as pb
from engine.updaters import UpdaterError, check_conf


#: spellings of SINGA's documentation ("RNN in SINGA" writes ``net { ... }``) -> the field
SINGA_DOC_SPELLINGS = {"net": "neuralnet"}


def _syntax_hint(msg: str, text: str, line: int | None, col: int | None) -> str:
    """Say what to do about a text-format error: the likely field or enum value meant,
    a field written in the wrong message (a misplaced brace), or an unclosed block."""
    pool = pb.DESCRIPTOR.pool
    m = re.search(r'Message type "([\w.]+)" has no field named "(\w+)"', msg)
    if m:
        try:
            owner, name = pool.FindMessageTypeByName(m.group(1)), m.group(2)
        except KeyError:
            return ""
        close = difflib.get_close_matches(name, list(owner.fields_by_name), n=1)
        if SINGA_DOC_SPELLINGS.get(name) in owner.fields_by_name:
            close = [SINGA_DOC_SPELLINGS[name]]
        homes = [d.name for d in pb.DESCRIPTOR.message_types_by_name.values()
                 if name in d.fields_by_name]
        if homes:
            return (f'; "{name}" is a field of {", ".join(homes[:3])}, not of {owner.name}: '
                    f'check the nesting (a missing or extra "}}" above?)')
        if close:
            return f'; did you mean "{close[0]}"?'
        return ""
    m = re.search(r'Enum type "([\w.]+)" has no value named (\w+)', msg)
    if m:
        try:
            enum_type = pool.FindEnumTypeByName(m.group(1))
        except KeyError:
            return ""
        values = [v for v in enum_type.values_by_name   # those never meant to be written out:
                  if v != "kUnknown" and not v.startswith("kUser")   # placeholders, user types,
                  and not (enum_type.name == "Phase" and enum_type.values_by_name[v].number > 4)]  # SINGA's flags
        close = difflib.get_close_matches(m.group(2), values, n=1)
        if close:
            return f"; did you mean {close[0]}?"
        if len(values) <= 8:
            return f"; use one of {', '.join(values)}"
        return ""
    m = re.search(r'should not have multiple "(\w+)" fields', msg)
    if m:
        return f'; keep one "{m.group(1)}" (only repeated fields may be given more than once)'
    if msg.startswith("Expected string"):
        return '; write text values in double quotes ("...")'
    if msg.endswith("got }"):
        return ' (an extra "}"?)'
    if msg.startswith('Expected "}"') and line is not None:
        lines = text.split("\n")
        rest = "\n".join([lines[line - 1][col - 1:]] + lines[line:]) if line <= len(lines) else ""
        tokens = re.sub(r"#[^\n]*", "", rest).split()
        if len(tokens) <= 1:  # nothing after the last token: the file ends inside a block
            return ' (the file ends before every "{" is closed; add the missing "}")'
    return ""


def parse_job(text: str, path: str = "<job>") -> pb.JobProto:
    """Parse protobuf text into a JobProto; syntax errors become ``path:line:col: msg``."""
    job = pb.JobProto()
    try:
        text_format.Parse(text, job)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        msg = str(e)
        # upb prefixes "line:col : "; strip it, we write our own prefix
        prefix = f"{line}:{col} : "
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
        # the tokenizer echoes the whole source line in quotes; line:col already points there
        lines = text.split("\n")
        if line is not None and 0 < line <= len(lines):
            echo = f"'{lines[line - 1]}': "
            if msg.startswith(echo):
                msg = msg[len(echo):]
        msg = msg.rstrip(".")
        ext = re.match(r'Extension "(\w+)" not registered', msg)
        if ext:   # a SINGA job extending its messages with its own C++ layers (rnnlm)
            msg = (f"user-defined layers (extension `{ext.group(1)}`) are not supported: they "
                   f"are C++ code of SINGA's own; write the net with the built-in layer types")
        else:
            msg += _syntax_hint(msg, text, line, col)
        if line is None:
            raise ConfigError(f"{path}: {msg}") from None
        raise ConfigError(f"{path}:{line}:{col}: {msg}") from None
    return job


def load_job(path: str | pathlib.Path) -> pb.JobProto:
    """Read, normalise and validate a job file. Raises ConfigError."""
    text = read_text(path, "job file", ConfigError, hint="give the job file (e.g. job.conf)")
    job = parse_job(text, str(path))
    normalise(job, str(path))
    validate(job, str(path))
    return job


def normalise(job: pb.JobProto, path: str = "<job>") -> pb.JobProto:
    """Fill defaults in place, once, so that nothing downstream re-derives them: a layer's
    unroll_len from the net's; connection_type -> unroll_conn_type; one unroll_conn_type
    (kUnrollOneToOne) and one shift (0) per srclayer where the file gives fewer. A job in
    SINGA's syntax (``singa_syntax``) gets SINGA's rules where they differ from ours: a
    kGRU declaring params has biases exactly when it declares more than 6 (gru.cc reads
    param_size() and ignores bias_term, so a bias_term that says otherwise is an error; a
    GRU declaring none, which SINGA cannot run, takes this engine's bias_term),
    and texts and vocabularies are read as bytes (SINGA's data.py wrote a set of bytes)."""
    net = job.neuralnet
    if singa_syntax(job):
        for layer in net.layer:
            if layer.type == pb.kGRU and layer.param:
                singa_bias = len(layer.param) > 6
                c = layer.gru_conf
                if c.HasField("bias_term") and c.bias_term != singa_bias:
                    raise ConfigError(
                        f'{path}: layer "{layer.name}": gru_conf.bias_term is '
                        f"{str(c.bias_term).lower()} but the layer declares "
                        f"{len(layer.param)} params; SINGA ignores bias_term and gives a GRU "
                        f"biases exactly when it declares more than 6 params (9: z_hx r_hx "
                        f"c_hx z_hh r_hh c_hh z_b r_b c_b), so remove bias_term or declare "
                        f"{'the 3 bias params' if c.bias_term else 'only the 6 weights'}")
                c.bias_term = singa_bias
            if layer.HasField("char_rnn_conf") and not layer.char_rnn_conf.encoding:
                layer.char_rnn_conf.encoding = "bytes"
    for layer in net.layer:
        if layer.connection_type:
            if layer.unroll_conn_type:
                raise ConfigError(f'{path}: layer "{layer.name}": both unroll_conn_type and its '
                                  f"synonym connection_type are set; keep one")
            layer.unroll_conn_type.extend(layer.connection_type)
            del layer.connection_type[:]
        if not layer.HasField("unroll_len"):
            layer.unroll_len = net.unroll_len
        n = len(layer.srclayers)
        layer.unroll_conn_type.extend([pb.kUnrollOneToOne] * (n - len(layer.unroll_conn_type)))
        layer.shift.extend([0] * (n - len(layer.shift)))
    _fit_readers(job, path)
    return job


def _fit_readers(job: pb.JobProto, path: str) -> None:
    """Each layer class settles what must agree with its readers (``Layer.fit_readers``:
    kCharRNN's char_rnn_conf.unroll_len follows the unroll_len of the layers reading
    the streams), phase by phase."""

    for ph in (Phase.TRAIN, Phase.VAL, Phase.TEST):
        layers = layers_in_phase(job.neuralnet, ph)
        for layer in layers:
            cls = layer_class(layer.type)
            if cls is None:
                continue  # validate names the unknown type
            readers = [r for r in layers if layer.name in r.srclayers and r.name != layer.name]
            problem = cls.fit_readers(layer, readers)
            if problem:
                raise ConfigError(f'{path}: layer "{layer.name}": {problem}')


def layer_phases(layer: pb.LayerProto) -> Phase:
    """The phases a layer takes part in, from its include / exclude lists."""
    every = Phase.TRAIN | Phase.VAL | Phase.TEST
    if layer.include:
        ph = Phase(0)
        for v in layer.include:
            if v in (1, 2, 4):
                ph |= Phase(v)
        return ph
    ph = every
    for v in layer.exclude:
        if v in (1, 2, 4):
            ph &= ~Phase(v)
    return ph


def layers_in_phase(net: pb.NetProto, phase: Phase) -> list[pb.LayerProto]:
    """The layers of ``net`` that take part in ``phase``, in file order."""
    return [layer for layer in net.layer if phase & layer_phases(layer)]


def validate(job: pb.JobProto, path: str = "<job>") -> None:
    """Check names, references, sharing, unrolling settings and per-type settings; then
    the job's counts (none negative) and numbers (updater, schedule, param inits and
    scales, loss scales: finite and within their sign rules)."""

    def err(layer, msg):
        return ConfigError(f'{path}: layer "{layer.name}": {msg}')

    net = job.neuralnet
    if not job.HasField("neuralnet") or not net.layer:
        raise ConfigError(f"{path}: the job has no layers; add neuralnet {{ layer {{ ... }} }}")
    if net.unroll_len < 1:
        raise ConfigError(f"{path}: neuralnet.unroll_len is {net.unroll_len}; it must be at least 1")
    if job.train_one_batch.alg in (pb.kCD, pb.kUserAlg) and job.HasField("train_one_batch"):
        raise ConfigError(f"{path}: train_one_batch.alg {pb.AlgType.Name(job.train_one_batch.alg)} "
                          f"is not supported; use kBP or kBPTT")
    has_inc = any(layer.include for layer in net.layer)
    has_exc = any(layer.exclude for layer in net.layer)
    if has_inc and has_exc:
        a = next(layer for layer in net.layer if layer.include)
        b = next(layer for layer in net.layer if layer.exclude)
        raise ConfigError(f'{path}: include (layer "{a.name}") and exclude (layer "{b.name}") are '
                          f"mixed in one file; use only include or only exclude")

    names_all = set()
    for layer in net.layer:
        if not layer.name:
            raise ConfigError(f"{path}: a layer of type {type_name(layer.type)} has no name; "
                              f"add name: \"...\"")
        for key in ("include", "exclude"):
            bad = [v for v in getattr(layer, key) if v not in (pb.kTrain, pb.kVal, pb.kTest)]
            if bad:
                name = pb.Phase.Name(bad[0])
                why = ("is not a phase (the layer would silently drop out)" if bad[0] == pb.kUnknown
                       else "is one of SINGA's internal flags, not a phase a job's layers are in")
                raise err(layer, f"{key} {name} {why}; use kTrain, kVal or kTest")
        for conn in list(layer.unroll_conn_type) + list(layer.connection_type):
            if conn == pb.kUnrollCustomized:
                raise err(layer, "kUnrollCustomized (SINGA's connection defined by C++ code, "
                                 "src_conn) is not supported; use kUnrollOneToOne (with shift), "
                                 "kUnrollOneToAll, kUnrollFirstToLast, kUnrollOneToFirst or "
                                 "kUnrollAllToOne")
        for ch in "#@":
            if ch in layer.name:
                raise err(layer, f"the name contains '{ch}', which unrolling reserves; rename it")
        names_all.add(layer.name)
    for ph in (Phase.TRAIN, Phase.VAL, Phase.TEST):
        seen = set()
        for layer in layers_in_phase(net, ph):
            if layer.name in seen:
                raise err(layer, f"two layers have this name in the {ph.label} phase; rename one, "
                                 f"or put them in different phases with include")
            seen.add(layer.name)

    # params: unique names (tied ones use share_from), share_from targets exist
    owners: dict[str, str] = {}
    for layer in net.layer:
        for p in layer.param:
            if not p.name:
                continue
            if "#" in p.name or "@" in p.name:
                raise err(layer, f'param "{p.name}": the name contains \'#\' or \'@\'; rename it')
            if p.share_from:
                continue
            prev = owners.get(p.name)
            if prev is not None and prev != layer.name:
                raise err(layer, f'param "{p.name}" is also declared by layer "{prev}"; rename it, '
                                 f'or tie it with share_from: "{p.name}"')
            if prev == layer.name and sum(q.name == p.name for q in layer.param) > 1:
                raise err(layer, f'param "{p.name}" is declared twice in this layer; rename one')
            owners[p.name] = layer.name
    for layer in net.layer:
        for p in layer.param:
            if p.share_from and p.share_from not in owners:
                raise err(layer, f'param "{p.name}": share_from "{p.share_from}" names no param; '
                                 f"name a param declared (without share_from) by another layer")

    for layer in net.layer:
        t = layer.type
        cls = layer_class(t)
        if t == pb.kUserLayer and not layer.HasField("type"):
            raise err(layer, "has no type; add type: kXxx (see the layer table in docs/config.md)")
        if cls is None:
            line = _layer_line(path, net, layer)
            supported = ", ".join(type_name(k) for k in sorted(REGISTRY))
            raise ConfigError(f'{path}{f":{line}" if line else ""}: layer "{layer.name}": type '
                              f"{type_name(t)} is not supported by this engine (it trains recurrent "
                              f"and fully connected nets; supported types: {supported})")
        if layer.unroll_len < 1:
            raise err(layer, f"unroll_len is {layer.unroll_len}; it must be at least 1")
        n = len(layer.srclayers)
        srcs = f"{n} srclayer" + ("" if n == 1 else "s")
        if len(layer.unroll_conn_type) > n:
            raise err(layer, f"{len(layer.unroll_conn_type)} unroll_conn_type entries for {srcs}; "
                             f"give at most one per srclayer, in srclayer order")
        if len(layer.shift) > n:
            raise err(layer, f"{len(layer.shift)} shift entries for {srcs}; give at most one per "
                             f"srclayer, in srclayer order")
        for k, s in enumerate(layer.shift):
            if s < 0 or s >= layer.unroll_len:
                raise err(layer, f"shift {s} for srclayer \"{layer.srclayers[k]}\" is outside "
                                 f"0..{layer.unroll_len - 1} (the layer's unroll_len is "
                                 f"{layer.unroll_len}); copy i reads source copy i - shift, so use "
                                 f"a shift from 0 to {layer.unroll_len - 1}")
        for k, (s, conn) in enumerate(zip(layer.shift, layer.unroll_conn_type)):
            if s != 0 and conn != pb.kUnrollOneToOne:
                raise err(layer, f"shift {s} for srclayer \"{layer.srclayers[k]}\", which is connected "
                                 f"{pb.UnrollConnType.Name(conn)}; a shift applies only to "
                                 f"kUnrollOneToOne, so remove it or set it to 0")
        seen_src = set()
        for s in layer.srclayers:
            if s not in names_all:
                raise err(layer, f'srclayer "{s}" is not a layer of this net; check the spelling')
            k = list(layer.srclayers).index(s)
            conn = layer.unroll_conn_type[k] if k < len(layer.unroll_conn_type) else pb.kUnrollOneToOne
            if s == layer.name and not (conn == pb.kUnrollOneToOne and k < len(layer.shift)
                                        and layer.shift[k] > 0):
                raise err(layer, "lists itself as a srclayer; recurrent layers read their previous "
                                 "step by themselves, and any layer may read its own earlier "
                                 "copy one-to-one with a shift >= 1")
            if s in seen_src:
                raise err(layer, f'srclayer "{s}" is listed twice; list it once')
            seen_src.add(s)
        for conf_field, sub in cls.required:
            conf = getattr(layer, conf_field)
            if not layer.HasField(conf_field) or not conf.HasField(sub):
                raise err(layer, f"{type_name(t)} needs {conf_field}.{sub}; add "
                                 f"{conf_field} {{ {sub}: ... }}")
            val = getattr(conf, sub)
            if isinstance(val, int) and val <= 0:
                raise err(layer, f"{conf_field}.{sub} is {val}; it must be positive")
        for cname, _ in cls.context_sources(layer):
            if cname not in names_all:
                raise err(layer, f'it reads layer "{cname}" as its context (for kRNNDummy: '
                                 f"rnn_dummy_conf.dynamic_srclayer), and that is not a layer of "
                                 f"this net")

    _check_counts(job, path)
    _check_user_types(job, path)
    _check_numbers(job, path)
    check_trains(job, path)


def check_trains(job: pb.JobProto, path: str, what: str = "") -> None:
    """A job that trains (train_steps > 0; ``what`` names where that number came from,
    e.g. ``--steps 5``) needs a loss layer in its train phase: without one every step
    would learn nothing and the metrics would be empty. A test-only job (sampling)
    needs none."""

    if job.train_steps <= 0:
        return
    classes = [layer_class(lay.type) for lay in layers_in_phase(job.neuralnet, Phase.TRAIN)]
    if not any(c is not None and issubclass(c, LossLayer) for c in classes):
        what = what or f"train_steps: {job.train_steps}"
        raise ConfigError(f"{path}: the job trains ({what}) but its train phase has no loss "
                          f"layer (kSoftmaxLoss, kEuclideanLoss), so no step would learn "
                          f"anything; add one, or set train_steps: 0 for a job that only tests")


def _check_user_types(job: pb.JobProto, path: str) -> None:
    """SINGA's user-defined types (the ``user_type`` fields, ParamProto type kUser) name C++
    classes registered with SINGA's driver; this engine has none, so each is one line naming
    where it is instead of being ignored. (kUserLayer, kUserAlg, kUserUpdater, kUserChange
    and kUserInit are refused where those types are read.)"""
    plugin = ("SINGA's user-defined types are C++ classes registered with its driver, and "
              "this engine has none; remove it")
    where_up = f"{path}: updater"
    for msg, what in ((job.updater, where_up), (job.updater.learning_rate,
                                                f"{where_up}.learning_rate")):
        if msg.HasField("user_type"):
            raise ConfigError(f'{what}: user_type "{msg.user_type}": {plugin}')
    for layer in job.neuralnet.layer:
        at = f'{path}: layer "{layer.name}"'
        if layer.HasField("user_type"):
            raise ConfigError(f'{at}: user_type "{layer.user_type}": {plugin}')
        for p in layer.param:
            pat = f'{at}: param "{p.name}"'
            if p.HasField("user_type"):
                raise ConfigError(f'{pat}: user_type "{p.user_type}": {plugin}')
            if p.type != pb.kParam:
                raise ConfigError(f"{pat}: type {pb.ParamType.Name(p.type)}: {plugin}")
            if p.init.HasField("user_type"):
                raise ConfigError(f'{pat}: init user_type "{p.init.user_type}": {plugin}')


# Counts and frequencies of JobProto that must not be negative: (field, what 0 means).
_COUNTS = [("train_steps", "0: no training, only the test phase"),
           ("disp_freq", "0: only at the end"), ("disp_after", ""),
           ("validate_freq", "0: only at the end"), ("validate_steps", "0: no validation"),
           ("validate_after", ""),
           ("test_freq", "0: only at the end"), ("test_steps", "0: no test phase"),
           ("test_after", ""),
           ("checkpoint_freq", "0: only at the end"), ("checkpoint_after", "")]

def _check_counts(job: pb.JobProto, path: str) -> None:
    """Counts and frequencies of the job: none negative; keep_checkpoints at least 1."""
    for field, zero in _COUNTS:
        v = getattr(job, field)
        if v < 0:
            raise ConfigError(f"{path}: {field} is {v}; it must be >= 0"
                              + (f" ({zero})" if zero else ""))
    if job.keep_checkpoints < 1:
        raise ConfigError(f"{path}: keep_checkpoints is {job.keep_checkpoints}; it must be at "
                          f"least 1 (the newest checkpoint is always kept)")


def _check_numbers(job: pb.JobProto, path: str) -> None:
    """The updater and its schedule (engine.updaters.check_conf), each param's init and
    scales (engine.params.check_param_conf) and each loss's scale (finite, >= 0)."""

    try:
        if job.HasField("updater"):  # a job that only tests needs none
            check_conf(job.updater)
    except UpdaterError as e:
        raise ConfigError(f"{path}: {e}") from None
    for layer in job.neuralnet.layer:
        for p in layer.param:
            try:
                check_param_conf(p)
            except ParamError as e:
                raise ConfigError(f'{path}: layer "{layer.name}": param "{p.name}": {e}') from None
        cls = layer_class(layer.type)
        sub = cls.scale_conf if cls is not None and issubclass(cls, LossLayer) else ""
        if sub:
            scale = getattr(layer, sub).scale
            bad = number_problem(f"{sub}.scale", scale, ">= 0 (0: the loss is reported and does "
                                 "not train)", scale >= 0)
            if bad:
                raise ConfigError(f'{path}: layer "{layer.name}": {bad}')
    # every other float of every message: no NaN or infinity anywhere (one generic walk over
    # the schema's float and double fields, not a list of them)
    for where, field, value in _floats(job):
        if not math.isfinite(value):
            raise ConfigError(f"{path}: {where}{field} is {value:g}; it must be a finite number")


_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


# ------------------------------------------------ SINGA's syntax, or this project's
#: the fields this project added to SINGA v0.3's schema (tests/test_singa_proto.py checks
#: this list against SINGA's own, field by field)
EXTENSION_FIELDS = frozenset({
    "JobProto.seed", "JobProto.keep_checkpoints", "JobProto.skip_nonfinite",
    "AlgProto.state_carry", "LayerProto.euclideanloss_conf", "LayerProto.csvoutput_conf",
    "LayerProto.char_rnn_output_conf", "LayerProto.connection_type", "LayerProto.rnn_conf",
    "LayerProto.lstm_conf", "LayerProto.mgu_conf", "UpdaterProto.clip_norm",
    "UpdaterProto.rprop_conf", "ArgSortProto.temperature", "StoreProto.shuffle",
    "CharRNNProto.encoding", "GRUProto.recurrent_bias", "GRUProto.direction"})
#: the enum values this project added (enum name -> value names)
EXTENSION_VALUES = {"LayerType": {"kRNN", "kLSTM", "kMGU"},
                    "UnrollConnType": {"kUnrollOneToFirst", "kUnrollAllToOne"},
                    "UpdaterType": {"kRProp"}, "ActivationType": {"LINEAR"}}


def file_in_singa_syntax(path) -> bool:
    """``singa_syntax`` of the job file as written (before ``normalise`` fills in settings
    of its own)."""
    return singa_syntax(parse_job(read_text(path, "job file"), str(path)))


def singa_syntax(job: pb.JobProto) -> bool:
    """Whether the job is written in SINGA v0.3's syntax alone: it sets no field and names
    no enum value that this project added. Such a job follows SINGA's rules where the two
    differ (a GRU's biases, a vocabulary's bytes, SINGA's checkpoint files beside ours)."""
    def clean(msg) -> bool:
        for fd, value in msg.ListFields():
            if f"{msg.DESCRIPTOR.name}.{fd.name}" in EXTENSION_FIELDS:
                return False
            values = value if fd.is_repeated else [value]
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                if not all(clean(v) for v in values):
                    return False
            elif fd.type == FieldDescriptor.TYPE_ENUM:
                added = EXTENSION_VALUES.get(fd.enum_type.name, ())
                if any(fd.enum_type.values_by_number[v].name in added for v in values):
                    return False
        return True
    return clean(job)


def _floats(msg, prefix: str = "", where: str = ""):
    """(where, dotted field name, value) of every float or double set in ``msg`` and its
    sub-messages; ``where`` names the layer (``layer "x": ``) inside a NetProto."""
    for fd, value in msg.ListFields():
        name = f"{prefix}{fd.name}"
        values = value if fd.is_repeated else [value]
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            for k, sub in enumerate(values):
                if isinstance(sub, pb.LayerProto):
                    yield from _floats(sub, "", f'layer "{sub.name}": ')
                else:
                    index = f"[{k}]" if fd.is_repeated else ""
                    yield from _floats(sub, f"{name}{index}.", where)
        elif fd.type in _FLOATS:
            for v in values:
                yield where, name, float(v)


# ------------------------------------------------ where a layer is in the file
# Protobuf's text parser keeps no line numbers, so an error about one layer finds
# the layer's line again in the file text.

_TOKEN = re.compile(r"""\s+|\#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[{}<>:\[\],;]"""
                    r"""|[^\s{}<>:\[\],;"'\#]+""")


def _text_tokens(text: str) -> list[tuple[str, int]]:
    """(token, line) of protobuf text format, without whitespace and # comments."""
    out, line = [], 1
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if not tok.isspace() and not tok.startswith("#"):
            out.append((tok, line))
        line += tok.count("\n")
    return out


def _string_value(tok: str) -> str:
    """The text of a quoted token, escapes resolved (C-style, as protobuf writes them)."""
    import ast
    try:
        return ast.literal_eval(tok)
    except (ValueError, SyntaxError):
        return tok[1:-1]


def layer_blocks(text: str) -> list[tuple[int, str | None]]:
    """(line, name) of every ``layer`` block of ``neuralnet``, in file order: the line of
    the word ``layer`` and the ``name`` written directly inside the block (None if absent).
    Handles # comments, both quote styles, adjacent strings, ``field: [ ... ]`` lists,
    ``<...>`` blocks and ``[extension]`` names; a nested ``param { name }`` is not the
    layer's name. ``text`` must be text that protobuf parsed."""
    toks = _text_tokens(text)
    n = len(toks)
    found: list[list] = []

    def scalar(i: int) -> tuple[int, str]:
        tok = toks[i][0]
        if tok[0] in "\"'":
            parts = []
            while i < n and toks[i][0][0] in "\"'":
                parts.append(_string_value(toks[i][0]))
                i += 1
            return i, "".join(parts)
        if tok == "-" and i + 1 < n:  # "- 5": a sign written apart from its number
            return i + 2, "-" + toks[i + 1][0]
        return i + 1, tok

    def block(i: int, path: tuple, name: str, line: int) -> int:
        path = path + (name,)
        if path == ("neuralnet", "layer"):
            found.append([line, None])
        return message(i + 1, path)

    def message(i: int, path: tuple) -> int:
        while i < n:
            tok, line = toks[i]
            if tok in ("}", ">"):
                return i + 1
            if tok in (";", ","):
                i += 1
                continue
            if tok == "[":  # [package.extension] field name
                j = i + 1
                while j < n and toks[j][0] != "]":
                    j += 1
                name, i = "[" + "".join(t for t, _ in toks[i + 1:j]) + "]", j + 1
            else:
                name, i = tok, i + 1
            if i < n and toks[i][0] == ":":
                i += 1
            if i >= n:
                break
            if toks[i][0] == "[":  # list syntax: name: [v, v] or [{...}, {...}]
                i += 1
                while i < n and toks[i][0] != "]":
                    if toks[i][0] == ",":
                        i += 1
                    elif toks[i][0] in ("{", "<"):
                        i = block(i, path, name, line)
                    else:
                        i, _ = scalar(i)
                i += 1
            elif toks[i][0] in ("{", "<"):
                i = block(i, path, name, line)
            else:
                i, value = scalar(i)
                if path == ("neuralnet", "layer") and name == "name":
                    found[-1][1] = value
        return i

    message(0, ())
    return [(line, name) for line, name in found]


def _layer_line(path, net: pb.NetProto, layer: pb.LayerProto) -> int | None:
    """Line of ``layer`` in the job file ``path`` (None when the file cannot tell): the
    k-th layer block for net.layer[k] when the file's blocks match the net's names, else
    the only block with the layer's name."""
    try:
        blocks = layer_blocks(pathlib.Path(path).read_text(encoding="utf-8", errors="replace"))
    except (OSError, IndexError, RecursionError):
        return None
    layers = list(net.layer)
    if [b[1] for b in blocks] == [lay.name for lay in layers]:
        return blocks[layers.index(layer)][0]
    same = [line for line, name in blocks if name == layer.name]
    return same[0] if len(same) == 1 else None
