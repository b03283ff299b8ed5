// PostgreSQL JDBC scenario: run directly and through the proxy by tests/clients.rs, which
// compares the two transcripts. Run as a single-file program:
//   java -cp /usr/share/java/postgresql.jar tests/clients/JdbcScenario.java URL
import java.sql.*;
import java.util.*;

public class JdbcScenario {
    static final List<String> out = new ArrayList<>();

    static void emit(String tag, Object value) {
        out.add(tag + "\t" + value);
    }

    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", "postgres");
        props.setProperty("prepareThreshold", "3");
        try (Connection c = DriverManager.getConnection(args[0], props)) {
            try (Statement s = c.createStatement()) {
                s.execute("CREATE TABLE t (id int PRIMARY KEY, n numeric(12,3), at timestamptz, s text, b bytea)");
            }
            // Batches.
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO t VALUES (?, ?, ?::timestamptz, ?, ?)")) {
                for (int i = 1; i <= 20; i++) {
                    ps.setInt(1, i);
                    ps.setBigDecimal(2, new java.math.BigDecimal(i + ".125"));
                    ps.setString(3, "2024-01-0" + (1 + i % 9) + " 10:00:00+00");
                    ps.setString(4, i % 4 == 0 ? null : "row " + i);
                    ps.setBytes(5, new byte[] {(byte) i, 0, (byte) 255});
                    ps.addBatch();
                }
                emit("batch", Arrays.toString(ps.executeBatch()));
            }
            // Server-prepared statements past prepareThreshold.
            try (PreparedStatement ps = c.prepareStatement("SELECT id, n, s, b FROM t WHERE id = ?")) {
                for (int i = 1; i <= 8; i++) {
                    ps.setInt(1, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) {
                            emit("prepared", rs.getInt(1) + " " + rs.getBigDecimal(2) + " " + rs.getString(3) + " " + Arrays.toString(rs.getBytes(4)));
                        }
                    }
                }
            }
            // A cursor: fetch size needs autocommit off.
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.setFetchSize(4);
                try (ResultSet rs = s.executeQuery("SELECT id, at FROM t ORDER BY id")) {
                    StringBuilder sb = new StringBuilder();
                    while (rs.next()) sb.append(rs.getInt(1)).append('@').append(rs.getTimestamp(2).toInstant()).append(' ');
                    emit("cursor", sb);
                }
            }
            c.commit();
            // Errors keep their SQLState; the transaction is rolled back.
            try (Statement s = c.createStatement()) {
                s.execute("INSERT INTO t (id) VALUES (1)");
            } catch (SQLException e) {
                emit("error", e.getSQLState() + " " + e.getMessage().split("\n")[0]);
                c.rollback();
            }
            c.setAutoCommit(true);
            try (Statement s = c.createStatement()) {
                boolean rs = s.execute("SELECT count(*) FROM t; UPDATE t SET s = s WHERE id < 5; SELECT 'last'");
                StringBuilder sb = new StringBuilder();
                do {
                    if (rs) {
                        try (ResultSet r = s.getResultSet()) { while (r.next()) sb.append(r.getString(1)).append(';'); }
                    } else {
                        sb.append("count=").append(s.getUpdateCount()).append(';');
                    }
                    rs = s.getMoreResults();
                } while (rs || s.getUpdateCount() != -1);
                emit("multi", sb);
            }
        }
        for (String line : out) System.out.println(line);
    }
}
