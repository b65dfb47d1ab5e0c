"""The QA benchmark's questions: behavioural questions about code nobody here wrote (CPython's stdlib).

Each question names its codebase and its gold definition(s) as ``relative/path.py:Qualified.name``; the gold
lines are derived from the AST of the copied file at run time (bench/qa.py), never written down here. A
question describes behaviour ("how is X done", "where is Y decided") and never names the gold function.
"""

from __future__ import annotations

from dataclasses import dataclass

# codebase -> the stdlib files it copies (relative to the stdlib directory)
CODEBASES: dict[str, tuple[str, ...]] = {
    "json": ("json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py"),
    "http": ("http/__init__.py", "http/client.py", "http/server.py"),
    "logging": ("logging/__init__.py", "logging/handlers.py"),
    "csv": ("csv.py",),
}


@dataclass(frozen=True)
class Question:
    codebase: str
    text: str
    gold: tuple[str, ...]  # "path:Qual.name"; any one of them counts


def q(codebase: str, text: str, *gold: str) -> Question:
    return Question(codebase, text, gold)


QUESTIONS: list[Question] = [
    # -- json ------------------------------------------------------------------------------------------------
    q("json", "How are control characters inside a JSON string rejected while decoding?",
      "json/decoder.py:py_scanstring"),
    q("json", "How does the encoder escape non-ASCII characters when ensure_ascii is on?",
      "json/encoder.py:py_encode_basestring_ascii"),
    q("json", "Where does a decoding error work out the line and column of the failure?",
      "json/decoder.py:JSONDecodeError.__init__"),
    q("json", "How is a JSON object turned into a dict, and where do the object hooks get applied?",
      "json/decoder.py:JSONObject"),
    q("json", "How does the encoder detect a circular reference in a list or dict?",
      "json/encoder.py:_make_iterencode", "json/encoder.py:JSONEncoder.iterencode"),
    q("json", "How are NaN and infinite floats written out, and when are they refused?",
      "json/encoder.py:JSONEncoder.iterencode"),
    q("json", "How does the decoder parse a JSON array?", "json/decoder.py:JSONArray"),
    q("json", "What happens when there is extra data after a valid JSON document?",
      "json/decoder.py:JSONDecoder.decode"),
    q("json", "How does the command line tool read its input and pretty-print it?", "json/tool.py:main"),
    q("json", "How are surrogate pairs in unicode escapes combined while decoding a string?",
      "json/decoder.py:py_scanstring", "json/decoder.py:_decode_uXXXX"),
    q("json", "How are dictionary keys that are not strings handled when encoding, and how are keys sorted?",
      "json/encoder.py:_make_iterencode"),
    q("json", "How does the scanner decide which kind of value starts at a position in the text?",
      "json/scanner.py:py_make_scanner"),
    # -- http -----------------------------------------------------------------------------------------------
    q("http", "How does the HTTP client read a response body sent with chunked transfer encoding?",
      "http/client.py:HTTPResponse._read_chunked", "http/client.py:HTTPResponse._read_next_chunk_size",
      "http/client.py:HTTPResponse._get_chunk_left"),
    q("http", "How does the client decide whether to close the connection after a response?",
      "http/client.py:HTTPResponse._check_close"),
    q("http", "How does the server parse the request line and the HTTP version of a request?",
      "http/server.py:BaseHTTPRequestHandler.parse_request"),
    q("http", "How does the simple file server produce a listing of a directory?",
      "http/server.py:SimpleHTTPRequestHandler.list_directory"),
    q("http", "How does the file server decide which content type to send for a file?",
      "http/server.py:SimpleHTTPRequestHandler.guess_type"),
    q("http", "How does the server send an error response with an HTML body?",
      "http/server.py:BaseHTTPRequestHandler.send_error"),
    q("http", "How does the client send a request body that is a file or an iterable?",
      "http/client.py:HTTPConnection.send", "http/client.py:HTTPConnection._read_readable",
      "http/client.py:HTTPConnection._send_output"),
    q("http", "Where are header names and values checked for illegal characters before a request is sent?",
      "http/client.py:HTTPConnection.putheader"),
    q("http", "How is the status line of a response read and validated?", "http/client.py:HTTPResponse._read_status"),
    q("http", "How does the client open a tunnel through an HTTP proxy with CONNECT?",
      "http/client.py:HTTPConnection._tunnel"),
    q("http", "How does the file server map a URL path to a path on disk safely?",
      "http/server.py:SimpleHTTPRequestHandler.translate_path"),
    q("http", "How does the client skip interim 100 Continue responses before the real one?",
      "http/client.py:HTTPResponse.begin"),
    q("http", "How are response headers read and limited in number by the client?",
      "http/client.py:_read_headers", "http/client.py:parse_headers"),
    # -- logging --------------------------------------------------------------------------------------------
    q("logging", "How does a size-based rotating file handler decide it is time to roll over?",
      "logging/handlers.py:RotatingFileHandler.shouldRollover"),
    q("logging", "How is the time of the next rollover computed for time-based log rotation?",
      "logging/handlers.py:TimedRotatingFileHandler.computeRollover"),
    q("logging", "How does a logger find its level when its own level is not set?",
      "logging/__init__.py:Logger.getEffectiveLevel"),
    q("logging", "How are records passed on to the handlers of parent loggers?",
      "logging/__init__.py:Logger.callHandlers"),
    q("logging", "How are the arguments of a log call merged into the message text?",
      "logging/__init__.py:LogRecord.getMessage"),
    q("logging", "How is an exception's traceback turned into text in a formatted log record?",
      "logging/__init__.py:Formatter.formatException", "logging/__init__.py:Formatter.format"),
    q("logging", "How does a logger whose name contains dots get attached to its parents in the hierarchy?",
      "logging/__init__.py:Manager._fixupParents", "logging/__init__.py:Manager.getLogger"),
    q("logging", "Where is it decided whether a record passes the filters attached to a handler or logger?",
      "logging/__init__.py:Filterer.filter"),
    q("logging", "How does the one-call setup configure the root logger with a handler and a format?",
      "logging/__init__.py:basicConfig"),
    q("logging", "How does the socket handler serialize a record before sending it over the network?",
      "logging/handlers.py:SocketHandler.makePickle"),
    q("logging", "How does the buffering handler decide when to flush its buffer to the target?",
      "logging/handlers.py:MemoryHandler.shouldFlush", "logging/handlers.py:BufferingHandler.shouldFlush"),
    q("logging", "How does the queue handler prepare a record before putting it on the queue?",
      "logging/handlers.py:QueueHandler.prepare"),
    q("logging", "How does a formatter choose between percent, brace and dollar style format strings?",
      "logging/__init__.py:Formatter.__init__"),
    q("logging", "How does a stream handler write a record and handle errors while writing?",
      "logging/__init__.py:StreamHandler.emit"),
    # -- csv ------------------------------------------------------------------------------------------------
    q("csv", "How does the sniffer guess the delimiter of a CSV sample?",
      "csv.py:Sniffer._guess_delimiter", "csv.py:Sniffer._guess_quote_and_delimiter"),
    q("csv", "How does the sniffer decide whether the first row is a header?", "csv.py:Sniffer.has_header"),
    q("csv", "How does the dict reader build a row when it has more fields than field names?",
      "csv.py:DictReader.__next__"),
    q("csv", "How does the dict writer handle dictionary keys that are not among the field names?",
      "csv.py:DictWriter._dict_to_list"),
    q("csv", "How are the field names taken from the first row when none are given?", "csv.py:DictReader.fieldnames"),
]
