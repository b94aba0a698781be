package nbd

// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md) and
// pure encode/decode helpers over byte slices. Nothing here does I/O, so the
// parsers can be fuzzed directly.
//
// Invariants:
//   - Every parser checks lengths before indexing and never panics on any input.
//   - All integers are big-endian on the wire.

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Handshake magics and flags.
const (
	nbdMagic      = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic      = 0x49484156454f5054 // "IHAVEOPT"
	optReplyMagic = 0x0003e889045565a9

	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	clientFlagFixedNewstyle = 1 << 0
	clientFlagNoZeroes      = 1 << 1
	clientFlagsKnown        = clientFlagFixedNewstyle | clientFlagNoZeroes
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
)

// Option replies.
const (
	repAck    = 1
	repServer = 2
	repInfo   = 3

	repFlagError  = 1 << 31
	repErrUnsup   = repFlagError | 1
	repErrPolicy  = repFlagError | 2
	repErrInvalid = repFlagError | 3
	repErrUnknown = repFlagError | 6
)

// NBD_INFO types.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags.
const (
	tflagHasFlags        = 1 << 0
	tflagReadOnly        = 1 << 1
	tflagSendFlush       = 1 << 2
	tflagSendFUA         = 1 << 3
	tflagSendTrim        = 1 << 5
	tflagSendWriteZeroes = 1 << 6
	tflagCanMultiConn    = 1 << 8
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
)

// Command flags.
const (
	cmdFlagFUA    = 1 << 0
	cmdFlagNoHole = 1 << 1
	cmdFlagDF     = 1 << 2
)

// Transmission magics and sizes.
const (
	requestMagic    = 0x25609513
	simpleMagic     = 0x67446698
	structuredMagic = 0x668e33ef

	requestSize          = 28
	simpleReplySize      = 16
	structuredHeaderSize = 20

	replyFlagDone       = 1 << 0
	replyTypeNone       = 0
	replyTypeOffsetData = 1
	replyTypeError      = 1<<15 + 1
)

// NBD errno values (the protocol fixes them; they are not the host's).
const (
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)

// maxOptionLen bounds the data of one option. Real options are a few hundred
// bytes at most (strings are capped at 4096); anything larger is treated as a
// hostile or broken client and the connection is dropped.
const maxOptionLen = 64 << 10

// maxStringLen is the protocol's limit on export names and other strings.
const maxStringLen = 4096

var (
	errBadMagic = errors.New("nbd: bad magic")
	errInvalid  = errors.New("nbd: invalid option data")
)

// optionHeader is the fixed part of a client option: magic(8) option(4) length(4).
type optionHeader struct {
	opt    uint32
	length uint32
}

// parseOptionHeader decodes the 16-byte option header.
func parseOptionHeader(b []byte) (optionHeader, error) {
	if len(b) < 16 {
		return optionHeader{}, fmt.Errorf("nbd: short option header (%d bytes)", len(b))
	}
	if binary.BigEndian.Uint64(b) != optMagic {
		return optionHeader{}, errBadMagic
	}
	return optionHeader{opt: binary.BigEndian.Uint32(b[8:]), length: binary.BigEndian.Uint32(b[12:])}, nil
}

// infoRequest is the data of NBD_OPT_INFO and NBD_OPT_GO.
type infoRequest struct {
	name  string
	infos []uint16
}

// parseInfoRequest decodes name length(4), name, count(2), count × info type(2).
// The lengths must account for every byte of data.
func parseInfoRequest(data []byte) (infoRequest, error) {
	if len(data) < 6 {
		return infoRequest{}, errInvalid
	}
	nl := binary.BigEndian.Uint32(data)
	if nl > maxStringLen || uint64(nl)+6 > uint64(len(data)) {
		return infoRequest{}, errInvalid
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	n := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*n {
		return infoRequest{}, errInvalid
	}
	infos := make([]uint16, n)
	for i := range infos {
		infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return infoRequest{name: name, infos: infos}, nil
}

// appendOptionReply appends an option reply header and its data.
func appendOptionReply(b []byte, opt, typ uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, optReplyMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// request is a decoded transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

// parseRequest decodes the 28-byte request header.
func parseRequest(b []byte) (request, error) {
	if len(b) < requestSize {
		return request{}, fmt.Errorf("nbd: short request (%d bytes)", len(b))
	}
	if binary.BigEndian.Uint32(b) != requestMagic {
		return request{}, errBadMagic
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:]),
		typ:    binary.BigEndian.Uint16(b[6:]),
		cookie: binary.BigEndian.Uint64(b[8:]),
		offset: binary.BigEndian.Uint64(b[16:]),
		length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// putSimpleReply writes a 16-byte simple reply header into b.
func putSimpleReply(b []byte, errno uint32, cookie uint64) {
	_ = b[simpleReplySize-1]
	binary.BigEndian.PutUint32(b, simpleMagic)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], cookie)
}

// putStructuredHeader writes a 20-byte structured reply chunk header into b.
func putStructuredHeader(b []byte, flags, typ uint16, cookie uint64, length uint32) {
	_ = b[structuredHeaderSize-1]
	binary.BigEndian.PutUint32(b, structuredMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], cookie)
	binary.BigEndian.PutUint32(b[16:], length)
}

// validFlags reports the command flags a command accepts. FUA is accepted on
// every command (clients set it liberally; it only matters for writes), DF is
// accepted on reads because we always reply with one data chunk.
func validFlags(typ uint16) uint16 {
	switch typ {
	case cmdRead:
		return cmdFlagFUA | cmdFlagDF
	case cmdWriteZeroes:
		return cmdFlagFUA | cmdFlagNoHole
	}
	return cmdFlagFUA
}

func putUint64(b []byte, v uint64) { binary.BigEndian.PutUint64(b, v) }
func putUint32(b []byte, v uint32) { binary.BigEndian.PutUint32(b, v) }
