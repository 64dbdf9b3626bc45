/* An independent Modbus TCP server (libmodbus, C): the PLC of edge bench and of the PLC link tests
 * (plc/native_peer.py builds it).
 * usage: libmodbus_server PORT ; prints "READY" once listening; serves one client at a time,
 * accepts the next one when a client goes away; 8192 holding registers from address 0. */
#include <errno.h>
#include <modbus.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s PORT\n", argv[0]); return 2; }
    modbus_t *ctx = modbus_new_tcp("127.0.0.1", atoi(argv[1]));
    modbus_mapping_t *map = modbus_mapping_new(0, 0, 8192, 0);
    if (!ctx || !map) { fprintf(stderr, "alloc failed\n"); return 1; }
    int listener = modbus_tcp_listen(ctx, 4);
    if (listener < 0) { fprintf(stderr, "listen: %s\n", modbus_strerror(errno)); return 1; }
    printf("READY\n");
    fflush(stdout);
    uint8_t query[MODBUS_TCP_MAX_ADU_LENGTH];
    for (;;) {
        if (modbus_tcp_accept(ctx, &listener) < 0) continue;
        for (;;) {
            int rc = modbus_receive(ctx, query);
            if (rc > 0) modbus_reply(ctx, query, rc, map);
            else if (rc == -1) break; /* client gone: accept the next one */
        }
        modbus_close(ctx);
    }
}
