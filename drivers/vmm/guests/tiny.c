/*
 * stead tiny test guest: freestanding 64-bit code, no SSE, no libc.
 *
 * The VMM loads this flat image at 0x100000 and enters `_start` (entry.S) in long
 * mode on every vCPU. The command line (NUL-terminated) selects what the guest does:
 *
 *   mode=hello    print a greeting, power off
 *   mode=mptable  find and check the MP table (ELF/PVH boot writes one), print counts
 *   mode=acpi     find the RSDP in 0xE0000-0xFFFFF like Linux, check every table's
 *                 checksum, count MADT Local APICs and DSDT LNRO0005 devices, then
 *                 power off through the FADT sleep control register
 *   mode=echo     echo serial input upper-cased (polling the 16550); 'q' powers off
 *   mode=irq      interrupt-driven: 8259 + local APIC set up, waits (sti; hlt) for the
 *                 serial THR-empty IRQ 4 and, with a disk, the virtio-blk IRQ 5
 *   mode=halt     print, then halt forever with interrupts off (ignores everything)
 *   mode=reset    print, then reset through the i8042 (port 0x64 <- 0xfe)
 *   mode=smp      every vCPU prints its id; vCPU 0 powers off once all have printed
 *   mode=blk      drive the virtio-blk device at 0xd0000000: read sector 0, write a
 *                 pattern to sector 1, flush, get-id; report statuses; power off
 *   mode=tick     print "tick N" forever; on a Ctrl-Alt-Del from the i8042, reset
 *   mode=seccomp  poke the VMM's test-only forbidden-syscall port, then power off
 *   mode=net      drive the virtio-net device at 0xd0000000: send one frame, then
 *                 print the payload of the first received frame of type 0x88b5
 *   mode=idle     demo guest: print a banner, then sleep (sti; hlt) until serial input
 *                 (IRQ 4, echoed upper-cased) or a key from the i8042 (IRQ 1); a
 *                 Ctrl-Alt-Del resets. Uses no CPU while idle.
 *
 * Power off is a write of 0 to the stead power port (0x600).
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define COM1 0x3f8
#define POWER_PORT 0x600
#define FORBIDDEN_PORT 0x5ec
#define MMIO_BASE 0xd0000000UL

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline void w32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 r32(u64 addr) { return *(volatile u32 *)addr; }
static inline u8 r8(u64 addr) { return *(volatile u8 *)addr; }

static volatile u32 print_lock;
static volatile u32 printed;

static void lock(void)
{
    while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
        __asm__ volatile("pause");
}
static void unlock(void) { __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE); }

static void putc_(char c) { outb(COM1, (u8)c); }
static void puts_(const char *s)
{
    while (*s)
        putc_(*s++);
}
static void putu(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_(&buf[i]);
}
static void puthex8(u8 v)
{
    const char *d = "0123456789abcdef";
    putc_(d[v >> 4]);
    putc_(d[v & 15]);
}

static void power_off(void)
{
    outb(POWER_PORT, 0);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

static int starts_with(const char *s, const char *p)
{
    while (*p)
        if (*s++ != *p++)
            return 0;
    return 1;
}

/* Finds "mode=" in the command line and returns what follows it. */
static const char *find_mode(const char *cmdline)
{
    for (const char *c = cmdline; c && *c; c++)
        if (starts_with(c, "mode="))
            return c + 5;
    return "";
}

static void memset_(void *d, int v, u64 n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)v;
}

/* ---------------------------------------------------------------- virtio-mmio */

#define VIRTIO_MAGIC 0x000
#define VIRTIO_VERSION 0x004
#define VIRTIO_DEVICE_ID 0x008
#define VIRTIO_DEV_FEATURES 0x010
#define VIRTIO_DEV_FEATURES_SEL 0x014
#define VIRTIO_DRV_FEATURES 0x020
#define VIRTIO_DRV_FEATURES_SEL 0x024
#define VIRTIO_QUEUE_SEL 0x030
#define VIRTIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_QUEUE_NUM 0x038
#define VIRTIO_QUEUE_READY 0x044
#define VIRTIO_QUEUE_NOTIFY 0x050
#define VIRTIO_INT_STATUS 0x060
#define VIRTIO_INT_ACK 0x064
#define VIRTIO_STATUS 0x070
#define VIRTIO_QUEUE_DESC_LO 0x080
#define VIRTIO_QUEUE_DESC_HI 0x084
#define VIRTIO_QUEUE_AVAIL_LO 0x090
#define VIRTIO_QUEUE_AVAIL_HI 0x094
#define VIRTIO_QUEUE_USED_LO 0x0a0
#define VIRTIO_QUEUE_USED_HI 0x0a4
#define VIRTIO_CONFIG 0x100

#define QSZ 16
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vdesc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};
struct vavail {
    u16 flags;
    u16 idx;
    u16 ring[QSZ];
};
struct vused_elem {
    u32 id;
    u32 len;
};
struct vused {
    u16 flags;
    u16 idx;
    struct vused_elem ring[QSZ];
};

struct vq {
    volatile struct vdesc *desc;
    volatile struct vavail *avail;
    volatile struct vused *used;
    u16 last_used;
    u16 index;
};

/* Each queue lives in its own 4 KiB page starting here. */
#define QUEUE_AREA 0x400000UL

static u64 dev_base;
static u64 dev_features_lo;

static int virtio_probe(u64 base, u32 want_id)
{
    dev_base = base;
    if (r32(base + VIRTIO_MAGIC) != 0x74726976 || r32(base + VIRTIO_VERSION) != 2) {
        puts_("virtio: bad magic/version\n");
        return -1;
    }
    if (r32(base + VIRTIO_DEVICE_ID) != want_id) {
        puts_("virtio: unexpected device id\n");
        return -1;
    }
    w32(base + VIRTIO_STATUS, 0);
    w32(base + VIRTIO_STATUS, 1);     /* ACKNOWLEDGE */
    w32(base + VIRTIO_STATUS, 1 | 2); /* DRIVER */
    w32(base + VIRTIO_DEV_FEATURES_SEL, 0);
    dev_features_lo = r32(base + VIRTIO_DEV_FEATURES);
    w32(base + VIRTIO_DEV_FEATURES_SEL, 1);
    u32 hi = r32(base + VIRTIO_DEV_FEATURES);
    if (!(hi & 1)) {
        puts_("virtio: no VERSION_1\n");
        return -1;
    }
    return 0;
}

static int virtio_accept(u32 features_lo)
{
    w32(dev_base + VIRTIO_DRV_FEATURES_SEL, 0);
    w32(dev_base + VIRTIO_DRV_FEATURES, features_lo & (u32)dev_features_lo);
    w32(dev_base + VIRTIO_DRV_FEATURES_SEL, 1);
    w32(dev_base + VIRTIO_DRV_FEATURES, 1); /* VIRTIO_F_VERSION_1 */
    w32(dev_base + VIRTIO_STATUS, 1 | 2 | 8); /* FEATURES_OK */
    if (!(r32(dev_base + VIRTIO_STATUS) & 8)) {
        puts_("virtio: FEATURES_OK refused\n");
        return -1;
    }
    return 0;
}

static void vq_setup(struct vq *q, u16 index)
{
    u64 area = QUEUE_AREA + (u64)index * 0x1000;
    memset_((void *)area, 0, 0x1000);
    q->desc = (volatile struct vdesc *)area;
    q->avail = (volatile struct vavail *)(area + 0x100);
    q->used = (volatile struct vused *)(area + 0x200);
    q->last_used = 0;
    q->index = index;
    w32(dev_base + VIRTIO_QUEUE_SEL, index);
    w32(dev_base + VIRTIO_QUEUE_NUM, QSZ);
    w32(dev_base + VIRTIO_QUEUE_DESC_LO, (u32)area);
    w32(dev_base + VIRTIO_QUEUE_DESC_HI, 0);
    w32(dev_base + VIRTIO_QUEUE_AVAIL_LO, (u32)(area + 0x100));
    w32(dev_base + VIRTIO_QUEUE_AVAIL_HI, 0);
    w32(dev_base + VIRTIO_QUEUE_USED_LO, (u32)(area + 0x200));
    w32(dev_base + VIRTIO_QUEUE_USED_HI, 0);
    w32(dev_base + VIRTIO_QUEUE_READY, 1);
}

static void virtio_driver_ok(void) { w32(dev_base + VIRTIO_STATUS, 1 | 2 | 8 | 4); }

/* Publishes the chain starting at descriptor `head`. */
static void vq_publish(struct vq *q, u16 head)
{
    u16 idx = q->avail->idx;
    q->avail->ring[idx % QSZ] = head;
    barrier();
    q->avail->idx = (u16)(idx + 1);
    barrier();
}

static void vq_kick(struct vq *q) { w32(dev_base + VIRTIO_QUEUE_NOTIFY, q->index); }

/* Waits for the next used element; returns its descriptor id and length. */
static u32 vq_wait(struct vq *q, u32 *len)
{
    while (q->used->idx == q->last_used)
        __asm__ volatile("pause");
    barrier();
    volatile struct vused_elem *e = &q->used->ring[q->last_used % QSZ];
    u32 id = e->id;
    if (len)
        *len = e->len;
    q->last_used++;
    w32(dev_base + VIRTIO_INT_ACK, r32(dev_base + VIRTIO_INT_STATUS));
    return id;
}

static int vq_poll(struct vq *q, u32 *id, u32 *len)
{
    if (q->used->idx == q->last_used)
        return 0;
    barrier();
    volatile struct vused_elem *e = &q->used->ring[q->last_used % QSZ];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}

/* ---------------------------------------------------------------- virtio-blk */

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_F_RO 5

struct blk_req {
    u32 type;
    u32 reserved;
    u64 sector;
};

#define BLK_HDR 0x500000UL
#define BLK_DATA 0x501000UL
#define BLK_STATUS 0x502000UL

static int blk_request(struct vq *q, u32 type, u64 sector, u32 len, int data_writable)
{
    volatile struct blk_req *h = (volatile struct blk_req *)BLK_HDR;
    h->type = type;
    h->reserved = 0;
    h->sector = sector;
    *(volatile u8 *)BLK_STATUS = 0xff;
    u16 n = 0;
    q->desc[0].addr = BLK_HDR;
    q->desc[0].len = sizeof(struct blk_req);
    q->desc[0].flags = VRING_DESC_F_NEXT;
    q->desc[0].next = 1;
    n = 1;
    if (len) {
        q->desc[1].addr = BLK_DATA;
        q->desc[1].len = len;
        q->desc[1].flags = VRING_DESC_F_NEXT | (data_writable ? VRING_DESC_F_WRITE : 0);
        q->desc[1].next = 2;
        n = 2;
    } else {
        q->desc[0].next = 2;
        n = 2;
    }
    q->desc[n].addr = BLK_STATUS;
    q->desc[n].len = 1;
    q->desc[n].flags = VRING_DESC_F_WRITE;
    q->desc[n].next = 0;
    vq_publish(q, 0);
    vq_kick(q);
    vq_wait(q, 0);
    return r8(BLK_STATUS);
}

static void mode_blk(void)
{
    struct vq q;
    if (virtio_probe(MMIO_BASE, 2) || virtio_accept(1u << VIRTIO_BLK_F_RO))
        power_off();
    vq_setup(&q, 0);
    virtio_driver_ok();

    u64 capacity = r32(dev_base + VIRTIO_CONFIG) | ((u64)r32(dev_base + VIRTIO_CONFIG + 4) << 32);
    puts_("blk: capacity=");
    putu(capacity);
    puts_(" ro=");
    putu((dev_features_lo >> VIRTIO_BLK_F_RO) & 1);
    puts_("\n");

    int st = blk_request(&q, VIRTIO_BLK_T_IN, 0, 512, 1);
    puts_("blk: read status=");
    putu((u64)st);
    puts_(" sector0=");
    volatile u8 *data = (volatile u8 *)BLK_DATA;
    for (int i = 0; i < 16 && data[i] >= 0x20 && data[i] < 0x7f; i++)
        putc_((char)data[i]);
    puts_("\n");

    const char *pat = "STEAD-PATTERN-1-";
    for (int i = 0; i < 512; i++)
        data[i] = (u8)pat[i % 16];
    st = blk_request(&q, VIRTIO_BLK_T_OUT, 1, 512, 0);
    puts_("blk: write status=");
    putu((u64)st);
    puts_("\n");

    st = blk_request(&q, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    puts_("blk: flush status=");
    putu((u64)st);
    puts_("\n");

    memset_((void *)BLK_DATA, 0, 32);
    st = blk_request(&q, VIRTIO_BLK_T_GET_ID, 0, 20, 1);
    puts_("blk: id status=");
    putu((u64)st);
    puts_(" id=");
    for (int i = 0; i < 20 && data[i]; i++)
        putc_((char)data[i]);
    puts_("\n");
    puts_("blk: done\n");
    power_off();
}

/* ---------------------------------------------------------------- virtio-net */

#define NET_HDR_LEN 12
#define NET_TX_BUF 0x600000UL
#define NET_RX_BUF 0x610000UL /* QSZ buffers of 2 KiB */
#define RX_BUF_LEN 2048

static void rx_post(struct vq *rx, u16 i)
{
    rx->desc[i].addr = NET_RX_BUF + (u64)i * RX_BUF_LEN;
    rx->desc[i].len = RX_BUF_LEN;
    rx->desc[i].flags = VRING_DESC_F_WRITE;
    rx->desc[i].next = 0;
    vq_publish(rx, i);
}

static void mode_net(void)
{
    struct vq rx, tx;
    if (virtio_probe(MMIO_BASE, 1) || virtio_accept(1u << 5 /* VIRTIO_NET_F_MAC */))
        power_off();
    vq_setup(&rx, 0);
    vq_setup(&tx, 1);
    virtio_driver_ok();

    u8 mac[6];
    puts_("net: mac=");
    for (int i = 0; i < 6; i++) {
        mac[i] = r8(dev_base + VIRTIO_CONFIG + i);
        puthex8(mac[i]);
        if (i < 5)
            putc_(':');
    }
    puts_("\n");

    for (u16 i = 0; i < 8; i++)
        rx_post(&rx, i);
    vq_kick(&rx);

    u8 *f = (u8 *)NET_TX_BUF;
    memset_(f, 0, NET_HDR_LEN);
    u8 *eth = f + NET_HDR_LEN;
    for (int i = 0; i < 6; i++) {
        eth[i] = 0xff;
        eth[6 + i] = mac[i];
    }
    eth[12] = 0x88;
    eth[13] = 0xb5;
    const char *msg = "stead-guest-tx";
    int n = 0;
    while (msg[n]) {
        eth[14 + n] = (u8)msg[n];
        n++;
    }
    u32 flen = 14 + (u32)n;
    while (flen < 60)
        eth[flen++] = 0;
    tx.desc[0].addr = NET_TX_BUF;
    tx.desc[0].len = NET_HDR_LEN + flen;
    tx.desc[0].flags = 0;
    tx.desc[0].next = 0;
    vq_publish(&tx, 0);
    vq_kick(&tx);
    vq_wait(&tx, 0);
    puts_("net: tx done\n");

    for (;;) {
        u32 id, len;
        if (!vq_poll(&rx, &id, &len)) {
            __asm__ volatile("pause");
            continue;
        }
        u8 *b = (u8 *)(NET_RX_BUF + (u64)id * RX_BUF_LEN) + NET_HDR_LEN;
        if (len > NET_HDR_LEN + 14 && b[12] == 0x88 && b[13] == 0xb5) {
            puts_("net: rx ");
            for (u32 i = 14; i < len - NET_HDR_LEN && b[i] >= 0x20 && b[i] < 0x7f; i++)
                putc_((char)b[i]);
            puts_("\n");
            power_off();
        }
        rx_post(&rx, (u16)id);
        vq_kick(&rx);
    }
}


/* ---------------------------------------------------------------- interrupts */

struct idt_gate {
    u16 off_lo;
    u16 sel;
    u8 ist;
    u8 type;
    u16 off_mid;
    u32 off_hi;
    u32 zero;
};

static struct idt_gate idt[256] __attribute__((aligned(16)));
static volatile u32 irq_count[16];

struct interrupt_frame;

static void pic_eoi(int irq)
{
    if (irq >= 8)
        outb(0xa0, 0x20);
    outb(0x20, 0x20);
}

#define ISR(n)                                                                   \
    __attribute__((interrupt)) static void isr_irq##n(struct interrupt_frame *f) \
    {                                                                            \
        (void)f;                                                                 \
        irq_count[n]++;                                                          \
        pic_eoi(n);                                                              \
    }
ISR(0)
ISR(1)
ISR(2)
ISR(3)
ISR(4)
ISR(5)
ISR(6)
ISR(7)

static void set_gate(int vec, void (*h)(struct interrupt_frame *))
{
    u64 a = (u64)h;
    idt[vec].off_lo = (u16)a;
    idt[vec].sel = 0x08;
    idt[vec].ist = 0;
    idt[vec].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
    idt[vec].off_mid = (u16)(a >> 16);
    idt[vec].off_hi = (u32)(a >> 32);
    idt[vec].zero = 0;
}

static void irq_setup(u8 unmasked)
{
    void (*h[8])(struct interrupt_frame *) = {isr_irq0, isr_irq1, isr_irq2, isr_irq3,
                                              isr_irq4, isr_irq5, isr_irq6, isr_irq7};
    for (int i = 0; i < 8; i++)
        set_gate(0x20 + i, h[i]);
    struct __attribute__((packed)) {
        u16 limit;
        u64 base;
    } idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
    /* 8259: vectors 0x20 (master) / 0x28 (slave), edge triggered. */
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 4);
    outb(0xa1, 2);
    outb(0x21, 1);
    outb(0xa1, 1);
    outb(0x21, (u8)~unmasked);
    outb(0xa1, 0xff);
    /* Local APIC: software-enable, LINT0 = ExtINT unmasked (PIC output). */
    w32(0xfee000f0, 0x1ff);
    w32(0xfee00350, 0x700);
}

/* Waits (hlt with interrupts on) until IRQ `n` has fired at least `want` times. */
static int irq_wait(int n, u32 want)
{
    for (int spins = 0; spins < 1000; spins++) {
        __asm__ volatile("cli");
        if (irq_count[n] >= want) {
            return 1;
        }
        __asm__ volatile("sti; hlt; cli");
    }
    return 0;
}

static void mode_irq(void)
{
    irq_setup((1 << 4) | (1 << 5));
    /* Serial: OUT2 on, THR-empty interrupt on; the 16550 model raises IRQ 4 at once. */
    outb(COM1 + 4, 0x08);
    outb(COM1 + 1, 0x02);
    __asm__ volatile("sti");
    if (irq_wait(4, 1))
        puts_("irq: serial irq4 ok\n");
    else
        puts_("irq: serial irq4 missing\n");
    outb(COM1 + 1, 0x00);

    if (r32(MMIO_BASE + VIRTIO_MAGIC) == 0x74726976) {
        struct vq q;
        if (virtio_probe(MMIO_BASE, 2) || virtio_accept(0))
            power_off();
        vq_setup(&q, 0);
        virtio_driver_ok();
        u32 before = irq_count[5];
        volatile struct blk_req *h = (volatile struct blk_req *)BLK_HDR;
        h->type = VIRTIO_BLK_T_IN;
        h->reserved = 0;
        h->sector = 0;
        q.desc[0].addr = BLK_HDR;
        q.desc[0].len = sizeof(struct blk_req);
        q.desc[0].flags = VRING_DESC_F_NEXT;
        q.desc[0].next = 1;
        q.desc[1].addr = BLK_DATA;
        q.desc[1].len = 512;
        q.desc[1].flags = VRING_DESC_F_NEXT | VRING_DESC_F_WRITE;
        q.desc[1].next = 2;
        q.desc[2].addr = BLK_STATUS;
        q.desc[2].len = 1;
        q.desc[2].flags = VRING_DESC_F_WRITE;
        vq_publish(&q, 0);
        vq_kick(&q);
        if (irq_wait(5, before + 1) && (r32(dev_base + VIRTIO_INT_STATUS) & 1))
            puts_("irq: virtio irq5 ok\n");
        else
            puts_("irq: virtio irq5 missing\n");
        w32(dev_base + VIRTIO_INT_ACK, 1);
    }
    __asm__ volatile("cli");
    power_off();
}

/* ---------------------------------------------------------------- other modes */

static void delay(u64 n)
{
    for (volatile u64 i = 0; i < n; i++)
        ;
}

static void mode_tick(void)
{
    u64 n = 0;
    u8 last[3] = {0, 0, 0};
    for (;;) {
        puts_("tick ");
        putu(n++);
        puts_("\n");
        for (int k = 0; k < 20; k++) {
            delay(200);
            while (inb(0x64) & 1) {
                last[0] = last[1];
                last[1] = last[2];
                last[2] = inb(0x60);
                /* Ctrl-Alt-Del ends with the Delete make code (set 2: 0xe0 0x71). */
                if (last[1] == 0xe0 && last[2] == 0x71) {
                    puts_("tick: ctrl-alt-del, rebooting\n");
                    outb(0x64, 0xfe);
                    halt_forever();
                }
            }
        }
    }
}

static void mode_idle(void)
{
    u8 last[2] = {0, 0};
    /* CR LF line ends: a raw-mode terminal (stead console) does not add the CR. */
    puts_("stead tiny guest: idle; type to echo, Ctrl-Alt-Del reboots\r\n");
    irq_setup((1 << 1) | (1 << 4));
    /* Serial: OUT2 on (IRQ line enabled), received-data-available interrupt on. */
    outb(COM1 + 4, 0x08);
    outb(COM1 + 1, 0x01);
    for (;;) {
        __asm__ volatile("cli");
        while (inb(COM1 + 5) & 1) {
            char c = (char)inb(COM1);
            if (c >= 'a' && c <= 'z')
                c = (char)(c - 32);
            if (c == '\r' || c == '\n') {
                puts_("\r\n");
                continue;
            }
            putc_(c);
        }
        while (inb(0x64) & 1) {
            last[0] = last[1];
            last[1] = inb(0x60);
            /* Ctrl-Alt-Del ends with the Delete make code (set 2: 0xe0 0x71). */
            if (last[0] == 0xe0 && last[1] == 0x71) {
                puts_("idle: ctrl-alt-del, rebooting\r\n");
                outb(0x64, 0xfe);
                halt_forever();
            }
        }
        __asm__ volatile("sti; hlt; cli");
    }
}

/* ---------------------------------------------------------------- ACPI */

static u32 le32(const u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }
static u64 le64(const u8 *p) { return le32(p) | (u64)le32(p + 4) << 32; }

static u8 sum8(const u8 *p, u32 n)
{
    u8 s = 0;
    for (u32 i = 0; i < n; i++)
        s += p[i];
    return s;
}

static int sig_is(const u8 *p, const char *sig)
{
    for (int i = 0; sig[i]; i++)
        if (p[i] != (u8)sig[i])
            return 0;
    return 1;
}

/* A table is good when its length is sane and its bytes sum to zero. */
static int table_ok(const u8 *t) { return le32(t + 4) >= 36 && sum8(t, le32(t + 4)) == 0; }

static void mode_acpi(void)
{
    const u8 *rsdp = 0;
    for (u64 a = 0xe0000; a < 0x100000; a += 16) {
        if (sig_is((const u8 *)a, "RSD PTR ")) {
            rsdp = (const u8 *)a;
            break;
        }
    }
    if (!rsdp) {
        puts_("acpi: no RSDP\n");
        power_off();
    }
    int bad = sum8(rsdp, 20) != 0 || rsdp[15] < 2 || sum8(rsdp, 36) != 0;
    const u8 *xsdt = (const u8 *)le64(rsdp + 24);
    bad |= !sig_is(xsdt, "XSDT") || !table_ok(xsdt);
    const u8 *fadt = 0, *madt = 0, *dsdt = 0;
    u32 n = (le32(xsdt + 4) - 36) / 8;
    for (u32 i = 0; i < n; i++) {
        const u8 *t = (const u8 *)le64(xsdt + 36 + 8 * i);
        bad |= !table_ok(t);
        if (sig_is(t, "FACP"))
            fadt = t;
        else if (sig_is(t, "APIC"))
            madt = t;
    }
    u32 cpus = 0, ioapics = 0, virtio = 0, hw_reduced = 0;
    if (madt) {
        for (u32 off = 44; off + 2 <= le32(madt + 4) && madt[off + 1]; off += madt[off + 1]) {
            cpus += madt[off] == 0 && (madt[off + 4] & 1);
            ioapics += madt[off] == 1;
        }
    }
    u16 sleep_port = 0;
    if (fadt) {
        hw_reduced = (le32(fadt + 112) >> 20) & 1;
        dsdt = (const u8 *)le64(fadt + 140);
        bad |= !sig_is(dsdt, "DSDT") || !table_ok(dsdt);
        if (fadt[244] == 1)
            sleep_port = (u16)le64(fadt + 248);
        for (u32 off = 36; off + 8 <= le32(dsdt + 4); off++)
            virtio += sig_is(dsdt + off, "LNRO0005");
    }
    puts_("acpi: checksums ");
    puts_(bad ? "bad" : "ok");
    puts_(fadt ? " fadt" : " no-fadt");
    puts_(madt ? " madt" : " no-madt");
    puts_(" hw_reduced=");
    putu(hw_reduced);
    puts_(" cpus=");
    putu(cpus);
    puts_(" ioapics=");
    putu(ioapics);
    puts_(" virtio=");
    putu(virtio);
    puts_("\n");
    if (sleep_port) {
        /* What Linux writes for S5: SLP_TYP (5) << 2 | SLP_EN. */
        outb(sleep_port, (5 << 2) | 0x20);
        puts_("acpi: sleep register did not power off\n");
    } else {
        puts_("acpi: no sleep control register\n");
    }
    power_off();
}

void guest_main(u64 cpu, u64 ncpus, const char *cmdline)
{
    const char *mode = find_mode(cmdline);
    if (starts_with(mode, "smp")) {
        lock();
        puts_("smp: cpu ");
        putu(cpu);
        puts_(" of ");
        putu(ncpus);
        puts_("\n");
        printed++;
        unlock();
        if (cpu != 0)
            halt_forever();
        while (printed < ncpus)
            __asm__ volatile("pause");
        puts_("smp: all cpus reported\n");
        power_off();
    }
    if (cpu != 0)
        halt_forever();
    if (starts_with(mode, "hello")) {
        puts_("hello from stead tiny guest\n");
        power_off();
    } else if (starts_with(mode, "mptable")) {
        /* Find and check the MP table the way Linux does (last KiB below 640 KiB). */
        const u8 *p = (const u8 *)0x9fc00;
        u32 i;
        for (i = 0; i < 1024; i += 16)
            if (p[i] == '_' && p[i + 1] == 'M' && p[i + 2] == 'P' && p[i + 3] == '_')
                break;
        if (i >= 1024) {
            puts_("mptable: not found\n");
            power_off();
        }
        const u8 *fp = p + i;
        u8 sum = 0;
        for (int k = 0; k < 16; k++)
            sum += fp[k];
        const u8 *t = (const u8 *)(u64)(fp[4] | fp[5] << 8 | fp[6] << 16 | (u32)fp[7] << 24);
        u32 len = t[4] | t[5] << 8;
        u8 tsum = 0;
        for (u32 k = 0; k < len; k++)
            tsum += t[k];
        u32 count = t[34] | t[35] << 8, cpus = 0, ioapics = 0, irqs = 0;
        const u8 *e = t + 44;
        for (u32 k = 0; k < count; k++) {
            if (e[0] == 0) {
                cpus++;
                e += 20;
            } else {
                ioapics += e[0] == 2;
                irqs += e[0] == 3;
                e += 8;
            }
        }
        puts_("mptable: checksums ");
        puts_(sum == 0 && tsum == 0 && t[0] == 'P' ? "ok" : "bad");
        puts_(" cpus=");
        putu(cpus);
        puts_(" ioapics=");
        putu(ioapics);
        puts_(" irqs=");
        putu(irqs);
        puts_("\n");
        power_off();
    } else if (starts_with(mode, "acpi")) {
        mode_acpi();
    } else if (starts_with(mode, "echo")) {
        puts_("echo: ready\n");
        for (;;) {
            if (!(inb(COM1 + 5) & 1)) {
                __asm__ volatile("pause");
                continue;
            }
            char c = (char)inb(COM1);
            if (c == 'q') {
                puts_("\necho: bye\n");
                power_off();
            }
            if (c >= 'a' && c <= 'z')
                c = (char)(c - 32);
            putc_(c);
        }
    } else if (starts_with(mode, "irq")) {
        mode_irq();
    } else if (starts_with(mode, "halt")) {
        puts_("halting\n");
        halt_forever();
    } else if (starts_with(mode, "reset")) {
        puts_("resetting\n");
        outb(0x64, 0xfe);
        halt_forever();
    } else if (starts_with(mode, "blk")) {
        mode_blk();
    } else if (starts_with(mode, "net")) {
        mode_net();
    } else if (starts_with(mode, "tick")) {
        mode_tick();
    } else if (starts_with(mode, "idle")) {
        mode_idle();
    } else if (starts_with(mode, "seccomp")) {
        puts_("seccomp: poking forbidden port\n");
        outb(FORBIDDEN_PORT, 1);
        puts_("seccomp: still alive\n");
        power_off();
    }
    puts_("unknown mode\n");
    power_off();
}
