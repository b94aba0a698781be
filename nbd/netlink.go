package nbd

// A minimal generic netlink client for the kernel's "nbd" family
// (include/uapi/linux/nbd-netlink.h): resolve the family, connect, disconnect,
// resize (reconfigure) and list devices. Messages and attributes are encoded here by hand; none of
// this is on the data path.
//
// Invariants:
//   - Every request carries NLM_F_ACK and a fresh sequence number, and a call
//     reads messages until the NLMSG_ERROR (acknowledgement or error) of that
//     sequence, so the socket is at a message boundary between calls.
//   - Attribute parsers check every length before slicing and never panic.
//   - Integers in netlink messages are in host byte order.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Generic netlink constants of the nbd family (nbd-netlink.h).
const (
	nbdGenlName    = "nbd"
	nbdGenlVersion = 1

	nbdCmdConnect     = 1
	nbdCmdDisconnect  = 2
	nbdCmdReconfigure = 3
	nbdCmdStatus      = 5

	nbdAttrIndex           = 1 // u32
	nbdAttrSizeBytes       = 2 // u64
	nbdAttrBlockSizeBytes  = 3 // u64
	nbdAttrTimeout         = 4 // u64, seconds
	nbdAttrServerFlags     = 5 // u64
	nbdAttrClientFlags     = 6 // u64
	nbdAttrSockets         = 7 // nested NBD_SOCK_ITEM
	nbdAttrDeadConnTimeout = 8 // u64, seconds
	nbdAttrDeviceList      = 9 // nested NBD_DEVICE_ITEM

	nbdSockItem = 1 // nested
	nbdSockFD   = 1 // u32

	nbdDeviceItem      = 1 // nested
	nbdDeviceIndex     = 1 // u32
	nbdDeviceConnected = 2 // u8
)

const (
	// sizeofGenlHdr is struct genlmsghdr: cmd, version, reserved u16.
	sizeofGenlHdr = 4
	// nlaTypeMask clears NLA_F_NESTED and NLA_F_NET_BYTEORDER.
	nlaTypeMask = ^uint16(unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
)

// errNoGenl reports that the kernel has no "nbd" generic netlink family.
var errNoGenl = errors.New("nbd: the kernel has no nbd generic netlink family")

// nlAttrs builds a sequence of netlink attributes.
type nlAttrs struct{ b []byte }

func nlAlign(n int) int { return (n + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1) }

// put appends one attribute with its padding.
func (a *nlAttrs) put(typ uint16, data []byte) {
	a.b = binary.NativeEndian.AppendUint16(a.b, uint16(unix.SizeofNlAttr+len(data)))
	a.b = binary.NativeEndian.AppendUint16(a.b, typ)
	a.b = append(a.b, data...)
	for len(a.b)%unix.NLA_ALIGNTO != 0 {
		a.b = append(a.b, 0)
	}
}

func (a *nlAttrs) u32(typ uint16, v uint32) {
	a.put(typ, binary.NativeEndian.AppendUint32(nil, v))
}

func (a *nlAttrs) u64(typ uint16, v uint64) {
	a.put(typ, binary.NativeEndian.AppendUint64(nil, v))
}

// nest appends a nested attribute whose content fill appends.
func (a *nlAttrs) nest(typ uint16, fill func()) {
	start := len(a.b)
	a.b = append(a.b, 0, 0, 0, 0)
	fill()
	binary.NativeEndian.PutUint16(a.b[start:], uint16(len(a.b)-start))
	binary.NativeEndian.PutUint16(a.b[start+2:], typ|unix.NLA_F_NESTED)
}

// nlAttr is one parsed attribute; typ has the nested and byte-order flags
// cleared.
type nlAttr struct {
	typ  uint16
	data []byte
}

// parseAttrs splits b into attributes.
func parseAttrs(b []byte) ([]nlAttr, error) {
	var out []nlAttr
	for len(b) > 0 {
		if len(b) < unix.SizeofNlAttr {
			return nil, fmt.Errorf("nbd: netlink attribute header truncated (%d bytes)", len(b))
		}
		l := int(binary.NativeEndian.Uint16(b))
		typ := binary.NativeEndian.Uint16(b[2:]) & nlaTypeMask
		if l < unix.SizeofNlAttr || l > len(b) {
			return nil, fmt.Errorf("nbd: netlink attribute %d has bad length %d (%d bytes left)", typ, l, len(b))
		}
		out = append(out, nlAttr{typ: typ, data: b[unix.SizeofNlAttr:l]})
		if n := nlAlign(l); n < len(b) {
			b = b[n:]
		} else {
			b = nil
		}
	}
	return out, nil
}

func (a nlAttr) u32() (uint32, error) {
	if len(a.data) < 4 {
		return 0, fmt.Errorf("nbd: netlink attribute %d: %d bytes, want 4", a.typ, len(a.data))
	}
	return binary.NativeEndian.Uint32(a.data), nil
}

func (a nlAttr) u16() (uint16, error) {
	if len(a.data) < 2 {
		return 0, fmt.Errorf("nbd: netlink attribute %d: %d bytes, want 2", a.typ, len(a.data))
	}
	return binary.NativeEndian.Uint16(a.data), nil
}

// genlConn is a generic netlink socket.
type genlConn struct {
	fd  int
	seq uint32
	buf []byte
}

// netlinkReplyTimeout bounds the wait for a kernel reply; connecting a device
// takes milliseconds.
const netlinkReplyTimeout = 60 * time.Second

// dialGenl opens a generic netlink socket.
func dialGenl() (*genlConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_GENERIC)
	if err != nil {
		return nil, fmt.Errorf("nbd: generic netlink socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nbd: binding generic netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(netlinkReplyTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nbd: netlink receive timeout: %w", err)
	}
	return &genlConn{fd: fd, seq: uint32(time.Now().UnixNano()), buf: make([]byte, 64<<10)}, nil
}

func (c *genlConn) close() error { return unix.Close(c.fd) }

// encodeGenl builds a generic netlink request message.
func encodeGenl(family uint16, cmd, version uint8, seq uint32, attrs []byte) []byte {
	n := unix.NLMSG_HDRLEN + sizeofGenlHdr + len(attrs)
	b := make([]byte, 0, n)
	b = binary.NativeEndian.AppendUint32(b, uint32(n))
	b = binary.NativeEndian.AppendUint16(b, family)
	b = binary.NativeEndian.AppendUint16(b, unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // port id: the kernel assigns ours
	b = append(b, cmd, version, 0, 0)
	return append(b, attrs...)
}

// request sends one command and returns the attributes of every reply
// message that came before the acknowledgement. A kernel error is returned as
// a syscall.Errno.
func (c *genlConn) request(family uint16, cmd, version uint8, attrs []byte) ([][]byte, error) {
	c.seq++
	seq := c.seq
	msg := encodeGenl(family, cmd, version, seq, attrs)
	if err := unix.Sendto(c.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("nbd: netlink send: %w", err)
	}
	var replies [][]byte
	for {
		n, _, err := unix.Recvfrom(c.fd, c.buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("nbd: netlink receive: %w", err)
		}
		done, err := parseReplies(c.buf[:n], seq, &replies)
		if done || err != nil {
			return replies, err
		}
	}
}

// parseReplies walks the netlink messages in b. Messages of other sequences
// are ignored. It appends the genl payload of data messages to replies and
// reports done at the NLMSG_ERROR or NLMSG_DONE of seq; a non-zero error code
// is returned as a syscall.Errno.
func parseReplies(b []byte, seq uint32, replies *[][]byte) (done bool, err error) {
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(b))
		typ := binary.NativeEndian.Uint16(b[4:])
		mseq := binary.NativeEndian.Uint32(b[8:])
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return false, fmt.Errorf("nbd: netlink message with bad length %d (%d bytes left)", l, len(b))
		}
		body := b[unix.NLMSG_HDRLEN:l]
		if mseq == seq {
			switch typ {
			case unix.NLMSG_ERROR:
				if len(body) < 4 {
					return true, errors.New("nbd: truncated netlink error message")
				}
				if code := int32(binary.NativeEndian.Uint32(body)); code != 0 {
					return true, syscall.Errno(-code)
				}
				return true, nil
			case unix.NLMSG_DONE:
				return true, nil
			default:
				if len(body) < sizeofGenlHdr {
					return false, errors.New("nbd: truncated generic netlink message")
				}
				*replies = append(*replies, append([]byte(nil), body[sizeofGenlHdr:]...))
			}
		}
		if n := (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1); n < len(b) {
			b = b[n:]
		} else {
			b = nil
		}
	}
	return false, nil
}

// familyID resolves a generic netlink family name. A missing family is
// reported as errNoGenl.
func (c *genlConn) familyID(name string) (uint16, error) {
	var a nlAttrs
	a.put(unix.CTRL_ATTR_FAMILY_NAME, append([]byte(name), 0))
	replies, err := c.request(unix.GENL_ID_CTRL, unix.CTRL_CMD_GETFAMILY, 1, a.b)
	if errors.Is(err, unix.ENOENT) {
		return 0, errNoGenl
	}
	if err != nil {
		return 0, fmt.Errorf("nbd: resolving generic netlink family %q: %w", name, err)
	}
	for _, r := range replies {
		attrs, err := parseAttrs(r)
		if err != nil {
			return 0, err
		}
		for _, at := range attrs {
			if at.typ == unix.CTRL_ATTR_FAMILY_ID {
				return at.u16()
			}
		}
	}
	return 0, fmt.Errorf("nbd: generic netlink family %q: no id in the reply", name)
}

// nbdGenl talks to the kernel's nbd family.
type nbdGenl struct {
	c  *genlConn
	id uint16
}

// openNBDGenl opens a netlink socket and resolves the nbd family; errNoGenl
// means the kernel (or the nbd module) lacks it.
func openNBDGenl() (*nbdGenl, error) {
	c, err := dialGenl()
	if err != nil {
		return nil, err
	}
	id, err := c.familyID(nbdGenlName)
	if err != nil {
		c.close()
		return nil, err
	}
	return &nbdGenl{c: c, id: id}, nil
}

func (g *nbdGenl) close() error { return g.c.close() }

// connectParams is the configuration of NBD_CMD_CONNECT.
type connectParams struct {
	index       int // -1: the kernel picks
	size        uint64
	blockSize   uint64
	serverFlags uint64
	timeout     time.Duration // 0: unset
	deadConn    time.Duration
	fds         []int
}

// seconds rounds d up to whole seconds.
func seconds(d time.Duration) uint64 { return uint64((d + time.Second - 1) / time.Second) }

// encodeConnect builds the attributes of NBD_CMD_CONNECT.
func encodeConnect(p connectParams) []byte {
	var a nlAttrs
	if p.index >= 0 {
		a.u32(nbdAttrIndex, uint32(p.index))
	}
	a.u64(nbdAttrSizeBytes, p.size)
	a.u64(nbdAttrBlockSizeBytes, p.blockSize)
	a.u64(nbdAttrServerFlags, p.serverFlags)
	if p.timeout > 0 {
		a.u64(nbdAttrTimeout, seconds(p.timeout))
	}
	a.u64(nbdAttrDeadConnTimeout, seconds(p.deadConn))
	a.nest(nbdAttrSockets, func() {
		for _, fd := range p.fds {
			a.nest(nbdSockItem, func() { a.u32(nbdSockFD, uint32(fd)) })
		}
	})
	return a.b
}

// connect configures a device with the sockets of p and returns its index.
func (g *nbdGenl) connect(p connectParams) (int, error) {
	replies, err := g.c.request(g.id, nbdCmdConnect, nbdGenlVersion, encodeConnect(p))
	if err != nil {
		return -1, fmt.Errorf("netlink NBD_CMD_CONNECT: %w", err)
	}
	for _, r := range replies {
		attrs, err := parseAttrs(r)
		if err != nil {
			return -1, err
		}
		for _, at := range attrs {
			if at.typ == nbdAttrIndex {
				v, err := at.u32()
				return int(v), err
			}
		}
	}
	if p.index >= 0 {
		return p.index, nil
	}
	return -1, errors.New("nbd: NBD_CMD_CONNECT reply carries no device index")
}

// disconnect asks the kernel to disconnect device index.
func (g *nbdGenl) disconnect(index int) error {
	var a nlAttrs
	a.u32(nbdAttrIndex, uint32(index))
	if _, err := g.c.request(g.id, nbdCmdDisconnect, nbdGenlVersion, a.b); err != nil {
		return fmt.Errorf("nbd: netlink NBD_CMD_DISCONNECT of nbd%d: %w", index, err)
	}
	return nil
}

// encodeReconfigureSize builds the attributes of an NBD_CMD_RECONFIGURE
// that sets the size of device index.
func encodeReconfigureSize(index int, size, blockSize uint64) []byte {
	var a nlAttrs
	a.u32(nbdAttrIndex, uint32(index))
	a.u64(nbdAttrSizeBytes, size)
	a.u64(nbdAttrBlockSizeBytes, blockSize)
	return a.b
}

// reconfigureSize asks the kernel to make connected device index size
// bytes long (NBD_CMD_RECONFIGURE with NBD_ATTR_SIZE_BYTES).
func (g *nbdGenl) reconfigureSize(index int, size, blockSize uint64) error {
	if _, err := g.c.request(g.id, nbdCmdReconfigure, nbdGenlVersion, encodeReconfigureSize(index, size, blockSize)); err != nil {
		return fmt.Errorf("netlink NBD_CMD_RECONFIGURE of nbd%d: %w", index, err)
	}
	return nil
}

// status lists device index, or every device when index is negative.
func (g *nbdGenl) status(index int) ([]KernelStatus, error) {
	var a nlAttrs
	if index >= 0 {
		a.u32(nbdAttrIndex, uint32(index))
	}
	replies, err := g.c.request(g.id, nbdCmdStatus, nbdGenlVersion, a.b)
	if err != nil {
		return nil, fmt.Errorf("nbd: netlink NBD_CMD_STATUS: %w", err)
	}
	var out []KernelStatus
	for _, r := range replies {
		st, err := parseStatus(r)
		if err != nil {
			return nil, err
		}
		out = append(out, st...)
	}
	return out, nil
}

// parseStatus decodes the attributes of an NBD_CMD_STATUS reply:
// NBD_ATTR_DEVICE_LIST { NBD_DEVICE_ITEM { NBD_DEVICE_INDEX, NBD_DEVICE_CONNECTED } ... }.
func parseStatus(b []byte) ([]KernelStatus, error) {
	attrs, err := parseAttrs(b)
	if err != nil {
		return nil, err
	}
	var out []KernelStatus
	for _, at := range attrs {
		if at.typ != nbdAttrDeviceList {
			continue
		}
		items, err := parseAttrs(at.data)
		if err != nil {
			return nil, err
		}
		for _, it := range items {
			if it.typ != nbdDeviceItem {
				continue
			}
			fields, err := parseAttrs(it.data)
			if err != nil {
				return nil, err
			}
			st := KernelStatus{Index: -1}
			for _, f := range fields {
				switch f.typ {
				case nbdDeviceIndex:
					v, err := f.u32()
					if err != nil {
						return nil, err
					}
					st.Index = int(v)
				case nbdDeviceConnected:
					st.Connected = len(f.data) > 0 && f.data[0] != 0
				}
			}
			if st.Index < 0 {
				return nil, errors.New("nbd: NBD_CMD_STATUS device item without an index")
			}
			out = append(out, st)
		}
	}
	return out, nil
}
